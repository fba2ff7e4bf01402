"""The options that relax the image trust rules (README, "Security model").

Each is something only the admin may say: the rules' defaults are the safe choices.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

if TYPE_CHECKING:
    from formats import OpenRules
    from tapnbd.control.messages import Trust

BackingFormatOpt = Annotated[
    str | None,
    typer.Option(
        "--backing-format",
        "-F",
        help="Format of the image's backing file (QCOW v1 cannot record it); without "
        "it the backing file is probed, and may not name a backing file itself.",
    ),
]
AllowProbedChainOpt = Annotated[
    bool,
    typer.Option(
        "--allow-probed-backing-chain",
        help="Follow backing file names read from probed headers: you trust the chain.",
    ),
]
AllowBlockOpt = Annotated[
    bool,
    typer.Option(
        "--allow-block-devices", help="Backing files may be block devices, not only files."
    ),
]
AllowRemoteOpt = Annotated[
    bool,
    typer.Option(
        "--allow-remote-backing",
        help="Follow backing file names that are NBD URIs or rbd: names: you trust the "
        "image's header to name servers and Ceph images.",
    ),
]
ForceShareOpt = Annotated[
    bool,
    typer.Option(
        "--force-share",
        "-U",
        help="Write the image even while it is in use, without asking its lock.",
    ),
]
#: The read-only commands' -U, as qemu-img's: a reader takes the image's reader locks
#: (formats.locks), which a writer in the way refuses; -U reads it anyway.
ReadShareOpt = Annotated[
    bool,
    typer.Option(
        "--force-share",
        "-U",
        help="Read the image even while a writer (a VM, a server) has it open; what is "
        "read may be changing under it.",
    ),
]
ShareOpt = Annotated[
    bool,
    typer.Option(
        "--share",
        help="Open images beside other users, writers included (QEMU's locks still show "
        "ours, but stop nobody).",
    ),
]


def open_rules(
    backing_format: str | None = None,
    allow_probed_chain: bool = False,
    allow_block_devices: bool = False,
    share: bool = False,
    *,
    allow_remote_backing: bool = False,
) -> OpenRules:
    """The OpenRules the options ask for."""
    from formats import OpenRules

    return OpenRules(
        backing_format=backing_format,
        allow_probed_backing=allow_probed_chain,
        allow_block_devices=allow_block_devices,
        allow_remote_backing=allow_remote_backing,
        share=share,
    )


def daemon_trust(
    backing_format: str | None,
    allow_probed_chain: bool,
    allow_block_devices: bool,
    allow_remote_backing: bool,
) -> Trust:
    """The same options as the daemon keeps them (``export add``, ``attach``)."""
    from tapnbd.control.messages import Trust

    rules = open_rules(
        backing_format,
        allow_probed_chain,
        allow_block_devices,
        allow_remote_backing=allow_remote_backing,
    )
    return Trust.of(rules)
