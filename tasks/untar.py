"""Step 2: extract the archive safely into extracted/<archive-sha256[:16]>/files/."""
from __future__ import annotations

import os

from storage.archive import Caps, extract
from storage.root import Root
from tasks.caching import step

VERSION = "2"
FILES = "files"


def untar_archive(archive: dict, root: str, max_members: int = Caps.max_members,
                  max_bytes: int = Caps.max_total_bytes) -> dict:
    """Extract into a staging folder published by rename, with a manifest of every file."""
    r = Root(root)
    rel = f"extracted/{archive['sha256'][:16]}"
    caps = Caps(max_members=max_members, max_total_bytes=max_bytes)
    with r.local_file(archive["file"]) as local, r.publish_dir(rel) as st:
        members = extract(local, st.file(FILES), caps=caps)
        for m in members:
            st.add(f"{FILES}/{m.path}", sha256=m.sha256, size=m.size)
        st.meta["archive_sha256"] = archive["sha256"]
        st.meta["dirs"] = folders(st.file(FILES))
    # extracted bytes are re-hashed by convert as it reads them, so a cache-hit check of sizes suffices
    return {"root": root, "dir": rel, "digest": st.digest, "deep": False, "files": len(members),
            "archive_sha256": archive["sha256"]}


def folders(top: str) -> list[str]:
    """Every extracted folder, relative to `top`: empty class folders matter to the layout."""
    out = []
    for here, dirs, _ in os.walk(top):
        out += [os.path.relpath(os.path.join(here, d), top).replace(os.sep, "/") for d in dirs]
    return sorted(out)


untar = step("untar", VERSION)(untar_archive)
