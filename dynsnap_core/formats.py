"""Every kind of file dynsnap writes, in one place: where it lives, how it starts (magic + format version).

`dynsnap inspect` decodes each of them. JSON kinds carry ``"magic"`` and ``"format"`` keys; binary kinds
are CRIU's own images (CRIU's magic numbers, decoded by crit) and raw data named by content.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

__all__ = ["FileKind", "KINDS", "kind_of_json", "SNAPSHOT_MANIFEST", "WEIGHT_SET", "SNAPSHOT_WEIGHTS", "REMOTE_MARKER",
           "CRIU_IMG_COMMON_MAGIC", "CRIU_IMG_SERVICE_MAGIC", "CRIU_FILES_MAGIC"]


@dataclass(frozen=True)
class FileKind:
    name: str
    where: str                   # path pattern
    magic: Optional[str]         # JSON "magic" value, or None for binary kinds
    format: Optional[int]        # current format version
    written_by: str              # the module that writes it
    what: str


SNAPSHOT_MANIFEST = FileKind("snapshot manifest", "SNAPSHOT/manifest.json", "dynsnap-snapshot", 2,
                             "dynsnap_core.snapshot.manifest", "process, versions, files with size + xxh3-64, timings, "
                             "GPU facts, root digest (sha256) over all of it; written last, then the staging "
                             "directory is renamed")
SNAPSHOT_WEIGHTS = FileKind("regions outside the image", "manifest.json: 'weights'", "dynsnap-weights", 1,
                            "dynsnap_core.snapshot.regions", "memory-service regions stored by content in a weight dir")
WEIGHT_SET = FileKind("weight set manifest", "STORE/sets/NAME.json", "dynsnap-weightset", 1,
                      "dynsnap_core.weights.store", "tensors: name, dtype, shape, shard, offset, nbytes, checksum")

REMOTE_MARKER = FileKind("remote snapshot marker", "s3://BUCKET/PREFIX/NAME/COMPLETE", None, 1,
                         "dynsnap_core.storage.s3", "uploaded last: the manifest's and every part's sha256; a "
                         "remote snapshot without it does not exist")

#: CRIU's image header words (criu/include/magic.h): every image opens with IMG_COMMON_MAGIC or
#: IMG_SERVICE_MAGIC, then its own magic (FILES_MAGIC for files.img, which criu_images rewrites).
CRIU_IMG_COMMON_MAGIC = 0x54564319
CRIU_IMG_SERVICE_MAGIC = 0x55105940
CRIU_FILES_MAGIC = 0x56303138

KINDS = [
    SNAPSHOT_MANIFEST,
    SNAPSHOT_WEIGHTS,
    FileKind("CRIU image", "SNAPSHOT/criu/*.img", None, None, "CRIU (criu dump)",
             "CRIU's protobuf images, each opening with CRIU's magic numbers; pages-*.img are raw pages"),
    FileKind("CRIU dump log", "SNAPSHOT/criu/dump.log", None, None, "CRIU", "CRIU's log of the dump"),
    WEIGHT_SET,
    REMOTE_MARKER,
    FileKind("weight object", "STORE/objects/DIGEST-SIZE", None, None, "dynsnap_core.weights.store",
             "raw shard or region bytes, 4 KiB aligned, named by chunked XXH3-64 digest and size"),
]


def kind_of_json(obj: object) -> Optional[FileKind]:
    """The kind of a parsed JSON document, by its magic."""
    if isinstance(obj, dict):
        for k in KINDS:
            if k.magic and obj.get("magic") == k.magic:
                return k
    return None
