"""The commits the writer builds in memory are exactly git's: same ids as ``git fast-import``
makes for the same changes, and a repository ``git fsck --strict`` finds nothing wrong with."""

from __future__ import annotations

import errno
import gc
import io
import os
import random
import subprocess
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pygit2
import pytest

from audit_reverser.gitstore import packing, repository
from audit_reverser.gitstore.repository import Mirror
from audit_reverser.gitstore.transport import LocalTransport
from audit_reverser.gitstore.types import FileChange, Identity
from tests.conftest import bare_repo, git, git_files, git_show

COMMITTER = Identity(name="audit-reverser", email="bot@audit-reverser.invalid")


def _mirror(tmp_path: Path, remote: Path) -> Mirror:
    mirror = Mirror(tmp_path / "mirror.git", LocalTransport(remote), "main", COMMITTER)
    mirror.open()
    mirror.sync()
    return mirror


def _changes(count: int, seed: int = 7) -> list[FileChange]:
    """Creates, updates and deletes across nested folders, in several time zones; deletes of
    a folder's last file make the folder disappear."""
    rnd = random.Random(seed)
    zones = [UTC, timezone(timedelta(hours=2)), timezone(-timedelta(hours=5, minutes=30))]
    made = []
    for i in range(count):
        folder = rnd.choice(["v1/configmaps/a", "v1/configmaps/b", "apps/v1/deployments/a", "x"])
        path = f"live/{folder}/f{rnd.randrange(6)}.yaml"
        content = None if rnd.random() < 0.25 else f"n: {i}\n".encode() * rnd.randrange(1, 40)
        made.append(
            FileChange(
                path=path,
                content=content,
                message=f"[CHANGE] {path}\n\nAudit-ID: {i}\n",
                author=Identity(name=f"Jane {i % 3}", email=f"jane{i % 3}@example.com"),
                time=datetime(2026, 3, 1, tzinfo=UTC).astimezone(rnd.choice(zones))
                + timedelta(seconds=i),
            )
        )
    return made


def _fast_import_stream(changes: list[FileChange], present: set[str]) -> bytes:
    """The fast-import commands for the changes that alter something, as our writer skips
    the others (deleting a missing file, writing the same content)."""
    out = []
    contents: dict[str, bytes] = {}
    for change in changes:
        if change.content is None and change.path not in present:
            continue
        if change.content is not None and contents.get(change.path) == change.content:
            continue
        when = change.time
        offset = when.strftime("%z").encode()
        stamp = b"%d %s" % (int(when.timestamp()), offset)
        message = change.message.encode()
        out += [
            b"commit refs/heads/main\n",
            b"author %s <%s> %s\n"
            % (change.author.name.encode(), change.author.email.encode(), stamp),
            b"committer %s <%s> %s\n" % (COMMITTER.name.encode(), COMMITTER.email.encode(), stamp),
            b"data %d\n%s" % (len(message), message),
        ]
        if change.content is None:
            out.append(b"D %s\n" % change.path.encode())
            present.discard(change.path)
            contents.pop(change.path, None)
        else:
            out.append(
                b"M 100644 inline %s\ndata %d\n%s\n"
                % (change.path.encode(), len(change.content), change.content)
            )
            present.add(change.path)
            contents[change.path] = change.content
    return b"".join(out)


def test_history_is_byte_identical_to_git_fast_import(tmp_path: Path) -> None:
    remote = bare_repo(tmp_path / "remote.git")
    mirror = _mirror(tmp_path, remote)
    changes = _changes(400)
    for start in range(0, len(changes), 37):  # batches, as the writer saves them
        for change in changes[start : start + 37]:
            mirror.commit(change)
        mirror.save()
    reference = bare_repo(tmp_path / "reference.git")
    subprocess.run(
        ["git", "-C", str(reference), "fast-import", "--quiet"],
        input=_fast_import_stream(changes, set()),
        check=True,
    )
    assert mirror.tip == git(reference, "rev-parse", "main").strip()
    git(mirror.path, "fsck", "--strict", "--full", "--no-dangling")
    mirror.push()
    git(remote, "fsck", "--strict", "--full", "--no-dangling")
    assert git(remote, "rev-parse", "main").strip() == mirror.tip


def test_large_folders_round_trip_through_deltas(tmp_path: Path) -> None:
    """A folder of 3,000 files (a 100 KiB tree) rewritten many times in one batch: its
    versions are deltas whose copies exceed git's 64 KiB copy unit."""
    remote = bare_repo(tmp_path / "remote.git")
    mirror = _mirror(tmp_path, remote)
    when = datetime(2026, 3, 1, tzinfo=UTC)
    author = Identity(name="Jane", email="jane@example.com")
    names = [f"live/v1/configmaps/big/cm-{i:05d}.yaml" for i in range(3000)]
    for name in names:
        mirror.commit(
            FileChange(path=name, content=b"v: 0\n", message="c", author=author, time=when)
        )
    for i, name in enumerate(random.Random(1).sample(names, 200)):
        body = f"v: {i + 1}\n".encode()
        mirror.commit(FileChange(path=name, content=body, message="u", author=author, time=when))
    mirror.save()
    git(mirror.path, "fsck", "--strict", "--full", "--no-dangling")
    assert len(git_files(mirror.path)) == 3000
    stats = git(
        mirror.path, "verify-pack", "-v", *map(str, (mirror.path / "objects/pack").glob("*.idx"))
    )
    assert "chain length = 50" in stats  # deltas made, and capped at git's default depth


def test_a_big_folder_is_stored_whole_once_per_batch(tmp_path: Path) -> None:
    """Hundreds of creates, updates and deletes anywhere in a folder of 3,000 files, in one
    batch: past the depth of a delta chain each version is a delta against the batch's whole
    version, so the folder is stored whole once; history as fast-import makes it."""
    remote = bare_repo(tmp_path / "remote.git")
    mirror = _mirror(tmp_path, remote)
    when = datetime(2026, 3, 1, tzinfo=UTC)
    author = Identity(name="Jane", email="jane@example.com")
    rnd = random.Random(3)
    names = [f"live/v1/configmaps/big/cm-{rnd.randrange(10**6):06d}.yaml" for _ in range(3000)]
    changes = [
        FileChange(path=name, content=b"v: 0\n", message=f"c {i}", author=author, time=when)
        for i, name in enumerate(names)
    ]
    for i in range(300):
        name = rnd.choice(names) if i % 3 else f"live/v1/configmaps/big/new-{rnd.randrange(10**6)}"
        body = None if i % 5 == 0 else f"v: {i + 1}\n".encode()
        changes.append(
            FileChange(path=name, content=body, message=f"u {i}", author=author, time=when)
        )
    for change in changes[:3000]:
        mirror.commit(change)
    mirror.save()
    for change in changes[3000:]:
        mirror.commit(change)
    mirror.save()
    reference = bare_repo(tmp_path / "reference.git")
    stream = _fast_import_stream(changes, set())
    subprocess.run(
        ["git", "-C", str(reference), "fast-import", "--quiet"], input=stream, check=True
    )
    assert mirror.tip == git(reference, "rev-parse", "main").strip()
    git(mirror.path, "fsck", "--strict", "--full", "--no-dangling")
    listings = [
        git(mirror.path, "verify-pack", "-v", str(idx))
        for idx in (mirror.path / "objects/pack").glob("*.idx")
    ]
    [second] = [text for text in listings if str(mirror.tip) in text]  # the second batch's
    listing = second.splitlines()
    whole_big_trees = [
        line
        for line in listing
        if " tree " in line and len(line.split()) == 5 and int(line.split()[2]) > 64 * 1024
    ]
    assert len(whole_big_trees) == 1
    depths = [
        int(line.split()[5]) for line in listing if " tree " in line and len(line.split()) == 7
    ]
    assert max(depths) <= 50 and len(depths) > 250


def test_earlier_versions_in_a_batch_read_back_from_their_deltas(tmp_path: Path) -> None:
    """Only the newest version of a delta chain is kept whole in memory; the others are
    rebuilt from their base when read, and the pack holds them all."""
    objects = packing.NewObjects(lambda oid: (0, b""))
    versions = [b"".join(b"line %d of %d\n" % (i, v) for i in range(100)) for v in range(60)]
    ids = [objects.add(packing.BLOB, versions[0])]
    for version in versions[1:]:
        ids.append(objects.add(packing.BLOB, version, delta_of=ids[-1]))
    for oid, version in zip(ids, versions, strict=True):
        assert objects.read(oid) == (packing.BLOB, version)
    pygit2.init_repository(str(tmp_path / "r.git"), bare=True)
    objects.write_pack(tmp_path / "r.git" / "objects" / "pack")
    git(tmp_path / "r.git", "fsck", "--full", "--strict")
    assert git(tmp_path / "r.git", "cat-file", "blob", ids[30].hex()).encode() == versions[30]


@pytest.mark.parametrize("size", [0, 1, 127, 128, 0x10000, 0x10001, 2 * 0x1000000 + 5])
def test_delta_encoding_matches_gits_reader(tmp_path: Path, size: int) -> None:
    """Inserts longer than 127 bytes and copies longer than 64 KiB or 16 MiB are split."""
    base = bytes(range(256)) * (size // 256 + 1)
    target = base[: size // 2] + b"changed" * 30 + base[size // 2 : size]
    objects = packing.NewObjects(lambda oid: (0, b""))
    first = objects.add(packing.BLOB, base[:size] + b"\0" * packing.MIN_DELTA_SIZE)
    objects.add(packing.BLOB, target + b"\0" * packing.MIN_DELTA_SIZE, delta_of=first)
    repo = pygit2.init_repository(str(tmp_path / "r.git"), bare=True)
    objects.write_pack(tmp_path / "r.git" / "objects" / "pack")
    git(tmp_path / "r.git", "fsck", "--full", "--strict")
    oid = pygit2.Oid(raw=packing.object_id(packing.BLOB, target + b"\0" * packing.MIN_DELTA_SIZE))
    assert repo[oid].data == target + b"\0" * packing.MIN_DELTA_SIZE


def test_packs_are_merged_in_tiers_after_pushes(tmp_path: Path) -> None:
    """One pack per batch; after a push, four packs of about the same size become one, so
    the count stays logarithmic (at most three per size tier, a factor of 4 apart), and
    nothing is lost."""
    remote = bare_repo(tmp_path / "remote.git")
    mirror = _mirror(tmp_path, remote)
    packs = mirror.path / "objects" / "pack"
    most = 0
    for change in _changes(80):
        if mirror.commit(change) is not None:
            mirror.save()  # one pack per batch of one
            mirror.push()
        sizes = [pack.stat().st_size for pack in packs.glob("*.pack")]
        tiers = (max(sizes).bit_length() - min(sizes).bit_length()) // 2 + 1
        assert len(sizes) <= 3 * tiers
        most = max(most, len(sizes))
    assert 3 < most < 12
    assert len(list(packs.glob("*.idx"))) == len(list(packs.glob("*.pack")))
    git(mirror.path, "fsck", "--strict", "--full", "--no-dangling")
    git(remote, "fsck", "--strict", "--full", "--no-dangling")
    assert git_files(remote) == git_files(mirror.path)


def test_merged_packs_are_let_go_of_at_once(tmp_path: Path) -> None:
    """A pack merged into another is removed, and this process holds it open no longer: a
    removed file kept open keeps its disk space, and its mapped index counts as memory
    (13 MiB after 40,000 commits into one folder). Cycle collection is off, as it may not
    run for a long time in a busy server."""
    remote = bare_repo(tmp_path / "remote.git")
    mirror = _mirror(tmp_path, remote)
    packs = mirror.path / "objects" / "pack"
    pushes = 0
    gc.disable()
    try:
        for change in _changes(40):
            if mirror.commit(change) is not None:
                mirror.save()
                pushes += mirror.push()
        held = [
            line.split(maxsplit=5)[-1]
            for line in Path("/proc/self/maps").read_text().splitlines()
            if str(packs) in line
        ]
    finally:
        gc.enable()
    assert len(list(packs.glob("*.pack"))) < pushes / 4  # merged, several times over
    assert [path for path in held if "(deleted)" in path] == []


def test_a_push_to_a_local_remote_hands_over_the_batch_pack(tmp_path: Path) -> None:
    """The remote receives the pack the batch wrote, byte for byte: no deltas recomputed."""
    remote = bare_repo(tmp_path / "remote.git")
    mirror = _mirror(tmp_path, remote)
    for change in _changes(30):
        mirror.commit(change)
    mirror.save()
    [ours] = (mirror.path / "objects" / "pack").glob("*.pack")
    assert mirror.push() == mirror_commits(mirror)
    assert (remote / "objects" / "pack" / ours.name).read_bytes() == ours.read_bytes()
    git(remote, "fsck", "--strict", "--full", "--no-dangling")
    assert git_files(remote) == git_files(mirror.path)


def test_the_batches_of_one_push_become_one_pack_in_the_mirror_and_the_remote(
    tmp_path: Path,
) -> None:
    """Three batches before a push: the mirror merges their packs once, keeps that pack
    instead of the three, and the remote gets the same pack; nothing merged twice."""
    remote = bare_repo(tmp_path / "remote.git")
    mirror = _mirror(tmp_path, remote)
    packs = mirror.path / "objects" / "pack"
    changes = [c for c in _changes(60) if c.content is not None]
    for batch in (changes[:20], changes[20:40], changes[40:]):
        for change in batch:
            mirror.commit(change)
        mirror.save()
    assert len(list(packs.glob("*.pack"))) == 3
    assert mirror.push() == mirror_commits(mirror)
    [ours] = packs.glob("*.pack")
    [theirs] = (remote / "objects" / "pack").glob("*.pack")
    assert theirs.name == ours.name and theirs.read_bytes() == ours.read_bytes()
    git(mirror.path, "fsck", "--strict", "--full", "--no-dangling")
    git(remote, "fsck", "--strict", "--full", "--no-dangling")
    assert git_files(remote) == git_files(mirror.path)


def mirror_commits(mirror: Mirror) -> int:
    return int(git(mirror.path, "rev-list", "--count", "main"))


def test_a_merge_that_fails_leaves_the_push_done_and_the_packs_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    remote = bare_repo(tmp_path / "remote.git")
    mirror = _mirror(tmp_path, remote)

    def disk_full(packs: list[Path], pack_dir: Path) -> Path:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(repository, "merge_packs", disk_full)
    for change in _changes(12):
        if mirror.commit(change) is not None:
            mirror.save()
            assert mirror.push() == 1
    assert len(list((mirror.path / "objects" / "pack").glob("*.pack"))) >= 4  # none merged
    git(mirror.path, "fsck", "--strict", "--full", "--no-dangling")
    assert git_files(remote) == git_files(mirror.path)


def test_merging_packs_keeps_one_copy_of_repeated_objects(tmp_path: Path) -> None:
    """An object written again in a later pack (a file set back to an earlier content), with
    a delta based on it there, is kept once, and the delta still reads back."""
    repo = pygit2.init_repository(str(tmp_path / "r.git"), bare=True)
    pack_dir = tmp_path / "r.git" / "objects" / "pack"
    base = b"line of text\n" * 100
    target = base + b"one more line\n"
    first = packing.NewObjects(lambda oid: (0, b""))
    first.add(packing.BLOB, b"something else" * 50)
    shared = first.add(packing.BLOB, base)
    one = first.write_pack(pack_dir)
    second = packing.NewObjects(lambda oid: (0, b""))
    second.add(packing.BLOB, base)
    second.add(packing.BLOB, target, delta_of=shared)
    two = second.write_pack(pack_dir)
    assert one is not None and two is not None
    merged = packing.merge_packs([one, two], tmp_path)
    for old in (one, two):
        old.unlink()
        old.with_suffix(".idx").unlink()
    merged.rename(pack_dir / merged.name)
    merged.with_suffix(".idx").rename(pack_dir / merged.with_suffix(".idx").name)
    git(tmp_path / "r.git", "fsck", "--full", "--strict")
    listing = git(tmp_path / "r.git", "verify-pack", "-v", str(pack_dir / merged.name))
    assert sum(1 for line in listing.splitlines() if " blob " in line) == 3
    repo = pygit2.Repository(str(tmp_path / "r.git"))
    assert repo[pygit2.Oid(raw=packing.object_id(packing.BLOB, target))].data == target


@pytest.mark.parametrize("plan_ids", [1 << 14, 7, 1])
def test_a_merged_pack_is_indexed_as_git_indexes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, plan_ids: int
) -> None:
    """Packs sharing objects every way (an object in three packs, deltas whose base an
    earlier pack also holds, a pack sharing nothing): the merged pack keeps one copy of
    each object, and its index is byte for byte the one ``git index-pack`` makes of it,
    whether the ids are planned in one range or in many (some of them empty)."""
    monkeypatch.setattr(packing, "_PLAN_IDS", plan_ids)
    rnd = random.Random(5)
    pool = [f"line {k} of a file\n".encode() * rnd.randrange(30, 60) for k in range(300)]
    pack_dir = tmp_path / "packs"
    packs, contents = [], set()
    for n in range(5):
        objects = packing.NewObjects(lambda oid: (0, b""))
        chosen = rnd.sample(pool, 120) if n < 4 else [os.urandom(600) for _ in range(50)]
        previous = None
        for content in chosen:
            previous = objects.add(
                packing.BLOB, content, delta_of=previous if rnd.random() < 0.6 else None
            )
            contents.add(content)
        pack = objects.write_pack(pack_dir)
        assert pack is not None
        packs.append(pack)
    merged = packing.merge_packs(packs, tmp_path / "merged")
    repo = tmp_path / "r.git"
    pygit2.init_repository(str(repo), bare=True)
    git(repo, "index-pack", "-o", str(tmp_path / "by-git.idx"), str(merged))
    assert merged.with_suffix(".idx").read_bytes() == (tmp_path / "by-git.idx").read_bytes()
    for suffix in (".pack", ".idx"):
        (repo / "objects" / "pack" / merged.with_suffix(suffix).name).write_bytes(
            merged.with_suffix(suffix).read_bytes()
        )
    git(repo, "fsck", "--full", "--strict")
    listing = git(repo, "verify-pack", "-v", str(repo / "objects" / "pack" / merged.name))
    assert sum(1 for line in listing.splitlines() if " blob " in line) == len(contents)
    odb = pygit2.Repository(str(repo))
    for content in contents:
        assert odb[pygit2.Oid(raw=packing.object_id(packing.BLOB, content))].data == content


def test_an_interrupted_pack_is_cleaned_up_and_the_branch_is_untouched(tmp_path: Path) -> None:
    remote = bare_repo(tmp_path / "remote.git")
    mirror = _mirror(tmp_path, remote)
    [first, second] = [c for c in _changes(40) if c.content is not None][:2]
    mirror.commit(first)
    mirror.save()
    saved = mirror.tip
    mirror.commit(second)
    # A crash while writing the pack leaves a temporary file and the branch where it was.
    (mirror.path / "objects" / "pack" / "tmp_pack-123.pack").write_bytes(b"PACK\0\0")
    reopened = _mirror(tmp_path, remote)
    assert reopened.tip == saved
    assert not list((mirror.path / "objects" / "pack").glob("tmp_*"))
    assert git_show(mirror.path, first.path) == (first.content or b"").decode()


def test_merging_packs_bigger_than_a_copy_chunk(tmp_path: Path) -> None:
    """Packs are merged through a file a chunk at a time: packs of several chunks each come
    out whole, every object readable by git."""
    repo = pygit2.init_repository(str(tmp_path / "r.git"), bare=True)
    pack_dir = tmp_path / "r.git" / "objects" / "pack"
    packs, contents = [], []
    for n in range(2):
        objects = packing.NewObjects(lambda oid: (0, b""))
        for k in range(3):
            content = os.urandom(700_000) + f"{n}-{k}".encode()  # does not compress
            objects.add(packing.BLOB, content)
            contents.append(content)
        pack = objects.write_pack(pack_dir)
        assert pack is not None and pack.stat().st_size > 2 * packing._CHUNK
        packs.append(pack)
    merged = packing.merge_packs(packs, tmp_path / "merged")
    for old in packs:
        old.unlink()
        old.with_suffix(".idx").unlink()
    for suffix in (".pack", ".idx"):
        merged.with_suffix(suffix).rename(pack_dir / merged.with_suffix(suffix).name)
    git(tmp_path / "r.git", "fsck", "--full", "--strict")
    repo = pygit2.Repository(str(tmp_path / "r.git"))
    for content in contents:
        assert repo[pygit2.Oid(raw=packing.object_id(packing.BLOB, content))].data == content


def test_a_pack_index_with_offsets_past_2_gib_reads_back_as_written() -> None:
    """Offsets of 2 GiB and more go to the index's table of large offsets (git's format);
    merging reads them back from there."""
    ids = [packing.object_id(packing.BLOB, b"%d" % n) for n in range(4)]
    ids.sort()
    offsets = [12, 0x7FFFFFFF, 0x80000000, 5 << 32]
    index = packing._encode_index(
        dict(zip(ids, offsets, strict=True)), dict.fromkeys(ids, 7), b"\0" * 20
    )
    table = packing.read_index(io.BytesIO(index))
    assert table.ids == b"".join(ids)
    assert list(table.offsets) == offsets
    assert list(table.crcs) == [7] * 4


def test_a_delta_made_from_shared_chunks_rebuilds_the_target() -> None:
    """chunked_delta (a big tree's next version, from its runs): whatever runs were changed,
    inserted, split or removed, applying the delta to the joined base gives the target, and
    the unchanged runs are copied, not inserted."""
    rnd = random.Random(5)
    for _ in range(200):
        base = [bytes(rnd.randbytes(rnd.randrange(1, 400))) for _ in range(rnd.randrange(0, 12))]
        target = list(base)
        for _ in range(rnd.randrange(1, 4)):
            at = rnd.randrange(len(target) + 1)
            match rnd.randrange(4):
                case 0 if at < len(target):  # a run changed in one place
                    run = bytearray(target[at])
                    run[rnd.randrange(len(run))] ^= 0xFF
                    target[at] = bytes(run)
                case 1:  # a run inserted
                    target.insert(at, rnd.randbytes(rnd.randrange(1, 300)))
                case 2 if at < len(target):  # a run removed
                    del target[at]
                case _ if at < len(target):  # a run split in two new objects
                    run = target[at]
                    cut = rnd.randrange(len(run) + 1)
                    target[at : at + 1] = [run[:cut] + b"", run[cut:] + b""]
        size = sum(map(len, target))
        delta = packing.chunked_delta(base, target, size)
        assert packing.apply_delta(b"".join(base), delta) == b"".join(target)
    shared = [rnd.randbytes(10_000) for _ in range(20)]
    changed = [*shared[:7], shared[7][:-1] + b"x", *shared[8:]]
    assert len(packing.chunked_delta(shared, changed, 200_000)) < 100
