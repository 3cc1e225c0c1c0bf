"""Find `<split>/<class>/<image>` in an extracted tree, whatever the archive wraps it in."""
from __future__ import annotations

import posixpath
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

from pixelsim.storage.errors import LayoutError

TRAIN_NAMES = ("train", "training")
VALID_NAMES = ("valid", "validation", "test", "testing")


def split_folders(children: set[str], asked: str | None, usual: tuple[str, ...]) -> list[str]:
    """The split folders among `children`: the one asked for (--train-split) by its exact name;
    else the usual names, in their order, each in any case (Train/, VALID/), exact spelling first."""
    if asked:
        return [asked] if asked in children else []
    found = []
    for name in usual:
        found += [name] if name in children else []
        found += sorted(c for c in children if c != name and c.lower() == name)
    return found


_DIGITS = re.compile(r"(\d+)")
# a shard's `label_index` column is int16 (storage/shards.py): a class beyond it has no label
MAX_CLASSES = 2**15 - 1
MAX_NAMED = 5   # ignored files or folders of one kind named in the notes (then a count), however many


def natural_key(name: str) -> tuple:
    """Sort "10" after "9" so class and file order reads the way people number things. Names
    equal by number ("3", "03") are ordered by their text, so the order is total: a class list
    never depends on a set's iteration order (which varies from process to process)."""
    parts: list = _DIGITS.split(name)   # text, digits, text, ...: digit runs at odd places
    parts[1::2] = map(int, parts[1::2])
    return tuple(parts), name


@dataclass(frozen=True)
class Layout:
    base: str                     # folder (relative to the tree) holding the split folders
    train: str                    # split folder names under base
    valid: str
    classes: list[str]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"base": self.base, "train": self.train, "valid": self.valid,
                "classes": list(self.classes), "notes": list(self.notes)}


_HIDDEN = re.compile(r"(?:^|/)(?:\.|__MACOSX(?:/|$))")


def _hidden(path: str) -> bool:
    """Dotfiles, dot-folders and macOS resource forks are never data."""
    return _HIDDEN.search(path) is not None


def _index(paths: list[str], folders: list[str]) -> tuple[dict[str, set[str]], dict[str, list[str]], Counter]:
    """Child folders and direct files of every folder, and how many files each holds at any depth.

    One pass, and each folder is walked up once: a million paths take seconds, not minutes.
    """
    dirs: dict[str, set[str]] = defaultdict(set)
    files: dict[str, list[str]] = defaultdict(list)
    direct: Counter = Counter()
    for p in paths:
        parent, name = p.rpartition("/")[::2]
        files[parent].append(name)
        direct[parent] += 1
    under: Counter = Counter()
    for folder in set(direct) | set(folders):
        n, parent = direct.get(folder, 0), folder
        while parent:
            up, _, leaf = parent.rpartition("/")
            dirs[up].add(leaf)
            under[parent] += n
            parent = up
    return dirs, files, under


def _same_split(name: str, where: str) -> str:
    return (f"--valid-split {name}: {where}/ is the training split; evaluating on the images the templates "
            "are made of would overstate the accuracy: name another folder")


def shown_name(name: str) -> str:
    """A name as its code points say it: "e\\u0301" for a decomposed é, which looks the same."""
    return '"' + name.encode("ascii", "backslashreplace").decode("ascii") + '"'


def _listed(items: list[str], say, more: str) -> list[str]:
    """Notes for the first MAX_NAMED items, then one counting the rest: an archive of a
    million stray files gets a few lines, not a million."""
    return [say(x) for x in items[:MAX_NAMED]] + ([f"... and {len(items) - MAX_NAMED} more {more}"]
                                                  if len(items) > MAX_NAMED else [])


def _class_folders(dirs: dict[str, set[str]], split: str) -> list[str]:
    return sorted(dirs.get(split, ()), key=natural_key)


def find_layout(paths: list[str], *, folders: list[str] = (), train_split: str | None = None, valid_split: str | None = None,
                classes: list[str] | None = None) -> Layout:
    """Locate the splits and classes; explicit split names win over the usual ones."""
    paths = [p for p in paths if not _hidden(p)]
    dirs, files, under = _index(paths, [d for d in folders if not _hidden(d)])
    base = None
    for folder in sorted(dirs, key=lambda d: (d.count("/") + bool(d), d)):
        if split_folders(dirs[folder], train_split, TRAIN_NAMES):
            base = folder
            break
    if base is None:
        raise LayoutError(f"no training split folder found (looked for {train_split or ', '.join(TRAIN_NAMES)}/); "
                          "expected <split>/<class>/<image>, or pass --train-split")
    join = lambda *p: posixpath.join(*[x for x in p if x])  # noqa: E731
    train = split_folders(dirs[base], train_split, TRAIN_NAMES)[0]
    notes: list[str] = []
    if valid_split == train:
        raise LayoutError(_same_split(valid_split, join(base, train)))
    valid = None
    for name in split_folders(dirs[base], valid_split, VALID_NAMES):
        if name == train:   # never evaluate on the images the templates are made of
            continue
        found = _class_folders(dirs, join(base, name))
        if found and any(under[join(base, name, c)] for c in found):
            valid = valid or name
            if valid != name:
                notes.append(f"split folder {name}/ not used for evaluation ({valid}/ was)")
        elif found:
            notes.append(f"split folder {name}/ ignored: its class folders hold no files")
        else:
            notes.append(f"split folder {name}/ ignored: it has no class folders (unlabeled)")
    if valid is None:
        wanted = valid_split or "/".join(VALID_NAMES)
        raise LayoutError(f"no labeled validation split folder ({wanted}) beside {join(base, train)}/")
    notes += _listed(sorted(dirs[base] - {train, valid} - set(split_folders(dirs[base], None, VALID_NAMES))),
                     lambda d: f"folder {d}/ ignored: not a split", "folder(s) beside the splits ignored")
    # another tree with its own splits beside this one (a/train/ and b/train/): said, not merged
    rivals = sorted((d for d in dirs if d != base and not d.startswith(base + "/" if base else "")
                     and split_folders(dirs[d], train_split, TRAIN_NAMES)), key=lambda d: (d.count("/"), d))
    notes += _listed(rivals, lambda d: f"folder {d}/ ignored: it holds a split folder of its own, but only "
                     f"{base or '.'}/ (the shallowest, first by name) is read; unpack the one you want on its own",
                     "such folder(s) ignored")

    def images(split: str, cls: str) -> int:
        return under[join(base, split, cls)]

    train_classes = [c for c in _class_folders(dirs, join(base, train))]
    empty = [c for c in train_classes if images(train, c) == 0]
    notes += _listed(empty, lambda c: f"class folder {join(base, train, c)}/ ignored: it holds no files",
                     "empty class folder(s) ignored")
    train_classes = [c for c in train_classes if c not in empty]
    if classes:
        unknown = [c for c in classes if c not in train_classes]
        if unknown:
            raise LayoutError(f"--classes {','.join(unknown)}: no such class folder in {join(base, train)}/ "
                              f"(found {', '.join(train_classes)})")
        train_classes = sorted(classes, key=natural_key)
    if len(train_classes) > MAX_CLASSES:
        raise LayoutError(f"{join(base, train)}/ holds {len(train_classes):,} class folders with images, over the "
                          f"{MAX_CLASSES:,} a shard can label: pick some with --classes")
    if len(train_classes) < 2:
        raise LayoutError(f"{join(base, train)}/ needs at least two class folders with images, found {train_classes}")
    valid_classes = [c for c in _class_folders(dirs, join(base, valid)) if images(valid, c)]
    missing = [c for c in valid_classes if c not in train_classes and not classes]
    if missing:
        import unicodedata
        folded = {unicodedata.normalize("NFC", c).casefold(): c for c in train_classes}
        twins = [(c, folded[k]) for c in missing if (k := unicodedata.normalize("NFC", c).casefold()) in folded]
        hint = "".join(f"; {shown_name(c)} differs from the training class {shown_name(t)} only in "
                       + ("Unicode form (NFC/NFD: rename one)" if c.casefold() != t.casefold() else "case")
                       for c, t in twins[:MAX_NAMED])
        raise LayoutError(f"validation class folder(s) {', '.join(join(base, valid, c) + '/' for c in missing[:MAX_NAMED])}"
                          + (f" and {len(missing) - MAX_NAMED} more" if len(missing) > MAX_NAMED else "")
                          + f" have no training images, so no template{hint}")
    # a dot-folder where a class would be is skipped like every hidden file: said, since it may be a class
    hidden = sorted({d for d in folders for split in (train, valid)
                     if posixpath.dirname(d) == join(base, split) and posixpath.basename(d).startswith(".")})
    notes += _listed(hidden, lambda d: f"folder {d}/ ignored: its name starts with a dot (hidden); rename it if it "
                     "is a class", "hidden folder(s) ignored")
    notes += _listed(files.get(base, []), lambda name: f"file {name} beside the split folders ignored",
                     "file(s) beside the split folders ignored")
    notes += _listed(files.get(join(base, train), []) + files.get(join(base, valid), []),
                     lambda name: f"file {name} beside the class folders ignored",
                     "file(s) beside the class folders ignored")
    return Layout(base=base, train=train, valid=valid, classes=train_classes, notes=notes)


def layout_paths(index: "pa.Table") -> list[str]:
    """The paths `find_layout` needs from an unpacked index, found in Arrow: every file of a
    folder that holds other folders (files beside split or class folders get a note), and one
    file of each other folder (where only "has files" counts). For MNIST-like data that is a
    few dozen paths instead of every image; the layout found is the same."""
    import pyarrow as pa
    import pyarrow.compute as pc

    path = index.column("path")
    visible = index.select(["path"]).filter(pc.invert(pc.match_substring_regex(path, _HIDDEN.pattern)))
    parent = pc.replace_substring_regex(visible.column("path"), r"(?:^|/)[^/]*$", "")   # no backtracking
    table = visible.append_column("parent", pc.utf8_rtrim(parent, "/"))
    firsts = table.group_by("parent").aggregate([("path", "min")])
    parents = firsts.column("parent").to_pylist()
    above = set()
    for folder in parents:
        while folder:
            folder = folder.rpartition("/")[0]
            if folder in above:
                break
            above.add(folder)
    holders = [p for p in parents if p in above]
    everything = table.filter(pc.is_in(table.column("parent"), value_set=pa.array(holders, pa.string())))
    return sorted(set(firsts.column("path_min").to_pylist()) | set(everything.column("path").to_pylist()))


def split_files(paths: list[str], layout: Layout, split: str) -> list[tuple[str, int]]:
    """(path, class index) of every file under the split's class folders, in a fixed order."""
    import pyarrow as pa

    rows = split_rows(pa.table({"path": pa.array(paths, pa.string())}), layout, split)
    return list(zip(rows.column("path").to_pylist(), rows.column("label").to_pylist()))


# a name with exactly one run of digits (0001.png, img_12.jpg): its natural order is a plain
# sort on (text before, the number, text after), so the common case needs no Python per file
_ONE_NUMBER_FIELDS = r"^(?P<a>[^0-9]*)(?P<n>[0-9]+)(?P<b>[^0-9]*)$"
_INT_DIGITS = 18   # every number of up to 18 digits fits an int64


def split_rows(index: "pa.Table", layout: Layout, split: str) -> "pa.Table":
    """The rows of the unpacked archive's index (a `path` column, and any others) that lie under
    the split's class folders, with a `label` (class index) column, sorted by class, then
    naturally by name. Vectorized in Arrow: a million paths take a fraction of a second when
    every name holds one number; other names fall back to `natural_key` in Python."""
    import pyarrow as pa
    import pyarrow.compute as pc

    prefix, rows = _in_split(index, layout, split)
    # <class>/<name> below the split folder, in one regex pass (null: deeper, or not under a class)
    parts = pc.extract_regex(pc.utf8_slice_codeunits(rows.column("path"), len(prefix)),
                             r"^(?P<cls>[^/]+)/(?P<name>[^/]+)$")
    label = pc.index_in(pc.struct_field(parts, "cls").combine_chunks(),   # one array: over the chunks it was slower
                        value_set=pa.array(list(layout.classes), pa.string()))
    keep = pc.and_(pc.is_valid(parts), pc.is_valid(label))
    rows = rows.append_column("label", label.cast(pa.int64())).filter(keep)
    if not len(rows):
        return rows
    name = pc.struct_field(parts.filter(keep), "name")
    pieces = pc.extract_regex(name, _ONE_NUMBER_FIELDS)   # null where a name has no or several numbers
    if pieces.null_count == 0:
        digits = pc.struct_field(pieces, "n")
        if pc.max(pc.utf8_length(digits)).as_py() <= _INT_DIGITS:
            # natural_key's order as columns: text before, number, text after, then the path
            # (within a class, the path orders as the name does: "3" and "03" are never a tie)
            keys = {"label": rows.column("label"), "a": pc.struct_field(pieces, "a"),
                    "n": pc.cast(digits, pa.int64()), "b": pc.struct_field(pieces, "b"), "path": rows.column("path")}
            del pieces, digits, name
            order = pc.sort_indices(pa.table(keys), sort_keys=[(k, "ascending") for k in keys])
            del keys
            return rows.take(order)
    names, labels = name.to_pylist(), rows.column("label").to_pylist()
    order = sorted(range(len(names)), key=lambda i: (labels[i], natural_key(names[i])))
    return rows.take(pa.array(order, pa.int64()))

def deeper_files(index: "pa.Table", layout: Layout, split: str) -> tuple[int, str | None]:
    """Files below a class folder's own subfolders (train/7/extra/a.png), which `split_rows`
    does not read: how many, and the first in path order (for a note that names one)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    prefix, rows = _in_split(index, layout, split)
    rest = pc.utf8_slice_codeunits(rows.column("path"), len(prefix))
    cls = pc.struct_field(pc.extract_regex(rest, r"^(?P<cls>[^/]+)/[^/]+/"), "cls")
    deep = rows.filter(pc.and_(pc.is_valid(cls), pc.is_in(cls, value_set=pa.array(list(layout.classes), pa.string()))))
    if not len(deep):
        return 0, None
    return len(deep), pc.min(deep.column("path")).as_py()


def _in_split(index: "pa.Table", layout: Layout, split: str) -> tuple[str, "pa.Table"]:
    """The split folder's prefix, and the index rows below it that are not hidden."""
    import pyarrow.compute as pc

    prefix = (posixpath.join(layout.base, split) if layout.base else split) + "/"
    rows = index.filter(pc.starts_with(index.column("path"), prefix))
    return prefix, rows.filter(pc.invert(pc.match_substring_regex(rows.column("path"), _HIDDEN.pattern)))


def check_names(folders: list[str], *, train_split: str | None = None, valid_split: str | None = None,
                classes: list[str] | None = None) -> None:
    """The split and class names asked for, against an unpacked archive's folders alone (no file
    is read): a name that is not there raises LayoutError naming the closest ones. Run before any
    work on a cached archive, so a typo costs a second, not a failed run."""
    import difflib

    dirs, _, _ = _index([], [d for d in folders if not _hidden(d)])
    join = lambda *p: posixpath.join(*[x for x in p if x])  # noqa: E731

    def unknown(option: str, name: str, where: str, names: set[str] | list[str]) -> LayoutError:
        close = difflib.get_close_matches(name, sorted(names), n=2)
        hint = f"did you mean {' or '.join(close)}? " if close else ""
        return LayoutError(f"{option} {name}: no such folder in {where or 'the archive'}/ ({hint}"
                           f"found {', '.join(sorted(names, key=natural_key)) or 'nothing'})")

    bases = [d for d in sorted(dirs, key=lambda d: (d.count("/") + bool(d), d))
             if split_folders(dirs[d], train_split, TRAIN_NAMES)]
    if not bases:
        if train_split:
            top = min(dirs, key=lambda d: (d.count("/") + bool(d), d), default="")
            near = max(dirs.items(), key=lambda kv: len(kv[1] & set(VALID_NAMES + TRAIN_NAMES)), default=(top, set()))
            raise unknown("--train-split", train_split, near[0], near[1])
        return   # find_layout says what is wrong with the archive itself
    base = bases[0]
    if valid_split and valid_split not in dirs[base]:
        raise unknown("--valid-split", valid_split, base, dirs[base])
    train = split_folders(dirs[base], train_split, TRAIN_NAMES)[0]
    if valid_split == train:
        raise LayoutError(_same_split(valid_split, join(base, train)))
    found = set(dirs.get(join(base, train), ()))
    for c in classes or ():
        if c not in found:
            raise unknown("--classes", c, join(base, train), found)
