"""Step 2: unpack the archive safely into extracted/<archive-sha256[:16]>/: every regular
file's bytes in one members.bin, indexed by members.parquet (path, offset, size, sha256)."""
from __future__ import annotations

from storage.archive import BLOB, INDEX, Caps, pack
from storage.root import Root
from tasks.caching import step

VERSION = "3"


def untar_archive(archive: dict, root: str, max_members: int = Caps.max_members,
                  max_bytes: int = Caps.max_total_bytes) -> dict:
    """Unpack into a staging folder published by rename, with the archive's folders in its manifest."""
    r = Root(root)
    rel = f"extracted/{archive['sha256'][:16]}"
    caps = Caps(max_members=max_members, max_total_bytes=max_bytes)
    with r.local_file(archive["file"]) as local, r.publish_dir(rel) as st:
        packed = pack(local, st.path, caps=caps)
        st.add(BLOB, sha256=packed.sha256, size=packed.bytes)
        st.add(INDEX)
        st.meta.update(archive_sha256=archive["sha256"], dirs=packed.dirs, members=packed.files)
    # members are re-hashed by convert as it reads them, so a cache-hit check of sizes suffices
    return {"root": root, "dir": rel, "digest": st.digest, "deep": False, "files": packed.files,
            "archive_sha256": archive["sha256"]}


untar = step("untar", VERSION)(untar_archive)
