"""Inputs that made tests.fuzz.nbd_codec fail, each with the bug it found (now fixed).

Replayed by tests/fuzz/test_nbd_codec.py through ``one_input``. Hex, as the fuzzer wrote them.
"""

from __future__ import annotations

CASES: dict[str, tuple[str, str]] = {
    "export_name_while_shutting_down": (
        "EXPORT_NAME got an ERR_SHUTDOWN option reply, which that option has no room for (handshake.py)",
        ("f2ffde07182373"),
    ),
    "drain_holds_consumed_bytes": (
        "while draining an oversized WRITE the decoder kept up to 256 KiB of consumed bytes (transmission.py)",
        (
            "e7ad2aaa00001000018f00018ff4a815b6830001000312d6b7ec0072c74c4a29401cf27893a27591"
            "f4a815b6830001000312d6b7ec0072c74c4a29e1b6c1ee270000ffffffff001000018ff4a815b683"
            "0001e1c74b89bd000312d6b7ec0072c74c4a29401cf27893a2759181d30516aa00001000018f08dc"
            "22930001004aa90072c74c4ae6e1b6"
        ),
    ),
    "error_message_over_4096": (
        "ERR_UNKNOWN quoted a 4096-byte name: a 4114-byte string, over the spec's limit (handshake.py)",
        ("00c1b12e531e1c99f597af36"),
    ),
    "feed_hangs_after_direct_payload": (
        "feed() looped forever once an in-place WRITE payload was complete and more bytes came (transmission.py)",
        (
            "014acfed6aa36aef7ce00bf6417a0bf61497ff9d4dfe3cb7562a218705947484122a32f87b8947d3"
            "02f708661da369aa48efd5c6ce0b01221e486fd2f46c33a04f9fcdfcda52c2177a24b171f6111a54"
            "bea5ca3800000000094c3f2de663e8fb9f17dc0e116e179022999e8645f7c989cb21da65e504e9a9"
            "bc9f9d742742c50436b5db19fee98b1bd98a46bfc2ef15a1b724ceaa6d880230e89caa4c7b685ae6"
            "8e2441c350b3373da40ee3fd52c2177a24b171f6"
        ),
    ),
    "error_chunk_cut_mid_character": (
        "error_chunk cut its message at 4096 bytes inside a UTF-8 character (transmission.py)",
        (
            "012c3b842e6159838ef86f7e371f4d4bcfe07b33e8b1dc13523e65174ba5ec2a52e973d1cdda6173"
            "b1a4c11807a573757cd54c805b8806fe5be1ffab10d2d9ce67381b197630be6d54cdcd60f9d810e7"
            "2a00e2ab557475bda10f319e0179b9cee44a06bc80581656b050497f17eeeb80a2d8ef9d2c0a8169"
            "56e2c3c006bd16fb6eb3de75ce1932e824438dbd20dcbf8dba6ed33567777ae54bc468dce76653b1"
            "4a1190fcbc91a412fb37d20ed8fc6f20575d88ce70e5a35380e0b0958dfa72ab8851c87a329e4d5d"
            "535fb32ddbc2817dc8d1fd80c3a0657201a04d4dbe2dba0d2ac8713380b66ab76e9dcbb13e421651"
            "656b589b5f687aa8e13bcb386621fd05422ef355f50e0ed8858a9df9185eb528cf7b5f3c9b03e0f0"
            "188ad8589d628df7f3158bd1a2d9f8e6f54e7ed39cffe0fed001413d456c13688b2d3a299f1be822"
            "9577aa489e582aecb3b6511753108dd4c7642488ad371d3b6b1d124b109f19bd895a7b1de99d4612"
            "f0536ef607088d1b9bd34a6cd17c92d29b444b6c2b6ca51b76e43790da65aec6e7312b7a8e22e741"
            "56120c71000100008b7e92cb2d1a699f0ef03602a7af2511964ed3c441a671c31c7dee6af6a0da47"
            "63f9038b5168154399077f98f0f460b577db8a68655e98fc9ebc92202e34c467bfb88c16975f16a9"
            "3dd344bba8e9e2f785e5a9766728c45eecd58ae67fc355c043f65b3e2df0738759f8894b18da252d"
            "d380d85f32774fe2c3f10e3339734f209b139dad1ddf1e3bef1b65e4d6b5cbb7a135a4178bce1626"
            "6ee4821ea72d848ba11fda80b39bcdf60d060beafbbc76f8d3653407fd3ce8f09da6684b1235c116"
            "4e43ec6659d7c7865bc42dcb7191c84d3d74f72be968fb33da51982e647c5b16ea134185dc41f7a8"
            "d7dc5b4a753f2071a12e3d78451ba4a5042b19dce46673f08c7518058f255a341251744995e5b7d8"
            "84ebff87b7f45f49082781aa5897e7e7e646796e1c17cb59cbd93f8a3a99938d78a5e6f6cb27cc50"
            "5024cefd1c5fbf6e901b8c7bc8203de26c2bb5ee557f743a76dad8c541136e6bbf6cc2519f474d1a"
            "6e6fdc0cc93b9da1966ff26e5477c056aaa4e77234ee1c805aae489628948c148a6137d20ed8fcbc"
            "f94cc862e4f9ec37a1afb92d8f96f84e4bf287e2acddc84e336011ac9a0fc1a5cbe10eea0a5dce43"
            "8e6d223db7c3dda53d2984f80ea9a8dc63f1562cd765c2d8ac39eebad4c67cbcc71533cfd82c81ce"
            "69b0212f7a52ae7dcc17a4279b74933d6a569b6c2e2e0a23f1940d77dde17c21981a58297568f4ca"
            "d7c0717dadcee0f1e3a2d2b39f66522a8370c70ad267d0443e9cdfae7fbaac855329896fbc9f474d"
            "0e20f0ed81e9e73aa3667874d506b161b6fc498e3c53ef887ad323dbdcec8f115bf9d40b3cb447f3"
            "0e79a62f67e8898332d89d"
        ),
    ),
    "lane_takes_an_oversized_write": (
        "next_small_write took a WRITE under SMALL_WRITE but over a smaller max_payload, which "
        "next_request drains and reports (transmission.py)",
        (
            "01ff05daa1c127b43b252a27d1facf433cd79388fc46b43b252a27d1fa88fc919600010000e1c42f"
            "0ce4336f5d88433cd79388fc91969d57fb58ffffffffe4336f5d89"
        ),
    ),
}
