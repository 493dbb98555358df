"""The bundle format: a folder with ``manifest.json`` and the files it lists, and how to trust it.

A bundle arrives over the network onto a robot, so everything read here is untrusted: names in the
manifest are checked to be plain relative paths that stay inside the bundle (:mod:`.paths`), no symlink
is followed, every file's size and sha256 are compared with the manifest (:mod:`.hashing`,
:mod:`.verification`), and unlisted files are reported. The manifest's schema is :mod:`.schema`; reading
and writing it, :mod:`.manifest`. Only the standard library is used, so the on-device runtime can import
this without the build dependencies. This module only re-exports the names the rest of edgekit uses.
"""

from .hashing import bundle_id, file_table, hash_file
from .manifest import MAX_MANIFEST_BYTES, Manifest, fsync_dir, read_manifest, write_manifest
from .schema import (
    BACKENDS,
    DIALECTS,
    LOGITS,
    MANIFEST,
    PRECISIONS,
    REQUIRED_KEYS,
    SCHEMA,
    SOURCE_KINDS,
    check_manifest,
    check_schema,
)
from .verification import QUICK_HASH_LIMIT, Problem, VerifyReport, verify

__all__ = ["BACKENDS", "DIALECTS", "LOGITS", "MANIFEST", "MAX_MANIFEST_BYTES", "PRECISIONS", "QUICK_HASH_LIMIT",
           "REQUIRED_KEYS", "SCHEMA", "SOURCE_KINDS", "Manifest", "Problem", "VerifyReport", "bundle_id",
           "check_manifest", "check_schema", "file_table", "fsync_dir", "hash_file", "read_manifest", "verify",
           "write_manifest"]
