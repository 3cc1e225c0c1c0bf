"""Step 2: unpack the archive safely into extracted/<key>/: every regular file's bytes in one
members.bin, indexed by members.parquet (path, offset, size, sha256)."""
from __future__ import annotations

import dataclasses

from pixelsim.storage import catalog
from pixelsim.storage.archive import BLOB, INDEX, Caps, pack
from pixelsim.storage.cache import Outcome, reuse_or_build
from pixelsim.storage.errors import CorruptArchive
from pixelsim.storage.root import Root
from pixelsim.tasks.contracts import Archive, Tree

VERSION = "5"   # 5: only members named as images are stored in the blob


def tree_dir(archive_sha256: str, caps: Caps = Caps()) -> str:
    """Where the archive with this digest is unpacked (the same folder whichever URL it came from)."""
    return catalog.tree_dir(catalog.step_key("untar", VERSION, archive_sha256, caps.__dict__))


def untar_archive(archive: Archive, max_members: int = Caps.max_members,
                  max_bytes: int = Caps.max_total_bytes, refresh: bool = False) -> Outcome[Tree]:
    """Unpack into a staging folder published by rename, with the archive's folders in its manifest."""
    r = Root(archive.root)
    caps = Caps(max_members=max_members, max_total_bytes=max_bytes)
    rel = tree_dir(archive.sha256, caps)

    def build() -> Tree:
        with r.local_file(archive.file) as local, r.publish_dir(rel) as st:
            try:
                packed = pack(local, st.path, caps=caps)
            except CorruptArchive as e:
                # a server that sent less than the whole file, with a Content-Length to match
                raise CorruptArchive(f"{e} (downloaded from {archive.url}: if the download was cut short, or the "
                                   "file has been fixed since, `pixelsim run --refresh` fetches it again)") from e
            st.add(BLOB, sha256=packed.sha256, size=packed.bytes)
            st.add(INDEX)
            out = Tree(root=archive.root, dir=rel, digest="", files=packed.files, archive_sha256=archive.sha256)
            st.meta.update(record=out.record(), dirs=packed.dirs)
        return dataclasses.replace(out, digest=st.digest)

    return reuse_or_build(r, rel, lambda: Tree.load(archive.root, rel), build, refresh=refresh)
