"""What a check found, for every format's ``check``: the problems (the first few listed,
all counted), the map of which clusters are in use, and the result with its exit code
and ``qemu-img check``'s JSON. Shared, so that checking a qcow2 or VHD image imports
neither the QCOW v1 driver nor its checker."""

from __future__ import annotations

from dataclasses import dataclass, field

#: Problems listed in full up to this many; the rest are counted ("and N more").
MAX_LISTED = 20


class Problems:
    """What is wrong with an image: the first ``limit`` messages, and a count of all.

    An image can be wrong in millions of places (an L1 table of 16 Mi bad entries);
    keeping a message for each would cost gigabytes.
    """

    def __init__(self, limit: int = MAX_LISTED) -> None:
        self.limit = limit
        self.listed: list[str] = []
        self.count = 0

    def add(self, message: str) -> None:
        self.count += 1
        if len(self.listed) < self.limit:
            self.listed.append(message)

    @property
    def full(self) -> bool:
        """No more messages are kept: later problems are only counted."""
        return len(self.listed) >= self.limit

    def __bool__(self) -> bool:
        return self.count > 0

    def summary(self) -> str:
        """The first problem, and how many more there are."""
        more = f" (and {self.count - 1} more)" if self.count > 1 else ""
        return self.listed[0] + more


#: Clusters per page of the usage map (64 KiB of map).
PAGE_BITS = 16
PAGE = 1 << PAGE_BITS
FREE, NORMAL, COMPRESSED = 0, 1, 2


class ClusterUse:
    """What each cluster of the file is used for: FREE, NORMAL or COMPRESSED data.

    A page of the map is made when a cluster in it is first used, so a 16 TiB sparse
    file with a few KiB of metadata costs a few pages, not a byte per cluster (4 GiB).
    """

    def __init__(self) -> None:
        self.pages: dict[int, bytearray] = {}

    def get(self, c: int) -> int:
        page = self.pages.get(c >> PAGE_BITS)
        return FREE if page is None else page[c & (PAGE - 1)]

    def set(self, c: int, use: int) -> None:
        page = self.pages.get(c >> PAGE_BITS)
        if page is None:
            page = self.pages[c >> PAGE_BITS] = bytearray(PAGE)
        page[c & (PAGE - 1)] = use

    def claim(self, c: int, use: int) -> int:
        """Mark cluster ``c``; what it was marked before (FREE if nothing)."""
        page = self.pages.get(c >> PAGE_BITS)
        if page is None:
            page = self.pages[c >> PAGE_BITS] = bytearray(PAGE)
        i = c & (PAGE - 1)
        was = page[i]
        page[i] = use
        return was

    def fill(self, lo: int, hi: int, use: int) -> None:
        """Mark clusters [lo, hi)."""
        while lo < hi:
            k = lo >> PAGE_BITS
            n = min(hi, (k + 1) << PAGE_BITS) - lo
            page = self.pages.get(k)
            if page is None:
                page = self.pages[k] = bytearray(PAGE)
            o = lo & (PAGE - 1)
            page[o : o + n] = bytes([use]) * n
            lo += n

    def used(self, lo: int, hi: int) -> int:
        """How many of clusters [lo, hi) are in use."""
        n = 0
        for k in range(lo >> PAGE_BITS, ((hi - 1) >> PAGE_BITS) + 1 if hi > lo else 0):
            page = self.pages.get(k)
            if page is not None:
                a, b = max(lo, k << PAGE_BITS) - (k << PAGE_BITS), min(hi, (k + 1) << PAGE_BITS)
                b -= k << PAGE_BITS
                n += (b - a) - page.count(0, a, b)
        return n


@dataclass
class CheckResult:
    """What ``check_qcow`` found."""

    filename: str
    #: Corruptions: the first MAX_LISTED messages, and the count of all.
    problems: Problems = field(default_factory=Problems)
    leaked_clusters: int = 0
    allocated_clusters: int = 0
    compressed_clusters: int = 0
    cluster_size: int = 0
    image_end_offset: int = 0
    #: "ok", "mismatch", "unchecked" (an L1 table over CKSUM_MAX_BYTES), or None when
    #: the image has no honoured extension.
    cksum: str | None = None
    #: The checksum guards the fast path of an allocation-optimised image.
    cksum_matters: bool = False
    notes: list[str] = field(default_factory=list)
    check_errors: list[str] = field(default_factory=list)
    #: For a repair: the clusters found in use, and the first one a leak may be.
    usage: ClusterUse | None = field(default=None, repr=False)
    leak_from: int = 0

    def corrupt(self, message: str) -> None:
        self.problems.add(message)

    @property
    def corruptions(self) -> list[str]:
        return self.problems.listed

    @property
    def corruption_count(self) -> int:
        return self.problems.count

    @property
    def exit_code(self) -> int:
        if self.check_errors:
            return 1
        if self.corruption_count:
            return 2
        if self.leaked_clusters:
            return 3
        if self.cksum == "mismatch" and self.cksum_matters:
            return 4
        return 0

    def to_json(self) -> dict[str, object]:
        """Field names as in ``qemu-img check --output=json`` where they exist."""
        return {
            "filename": self.filename,
            "format": "qcow",
            "check-errors": len(self.check_errors),
            "corruptions": self.corruption_count,
            "leaks": self.leaked_clusters,
            "allocated-clusters": self.allocated_clusters,
            "compressed-clusters": self.compressed_clusters,
            "cluster-size": self.cluster_size,
            "image-end-offset": self.image_end_offset,
            "cksum": self.cksum,
            "messages": self.check_errors + self.corruptions + self.notes,
            "exit-code": self.exit_code,
        }
