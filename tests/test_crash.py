"""Nothing lost, nothing half-written: every writer (save_adapter, save_merged, the trainer's
checkpoint-N, the full fine-tune's save_full) SIGKILLed at seeded random points of its code leaves
its destination absent or complete (the previous version or the new one, never a mix) and
loadable, and the next write into the same directory removes whatever the killed writer left;
a full disk is a clear WriteError that leaves the previous files as they were.

The kills run in one driver subprocess, which loads the model once and forks a child per kill
point; the child counts the lines it executes in minift's code and the standard library's file
code (sys.settrace) and SIGKILLs itself at the chosen one: half the points are drawn over the
whole save, half over the lines run by the atomic writer (minift/io/files.py: temporaries, fsync,
modes, the swap, clean-up), one of them in its last lines (the swap)."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import minift
from minift.errors import MiniftError, WriteError
from minift.testing import write_tiny_checkpoint
from minift.train import checkpoint as ckpt

# writer -> kill points; "save_adapter/rename" runs without renameat2(RENAME_EXCHANGE), through
# the fallback swap by two renames (and the restoring of a `.old-` copy a kill between them leaves)
KILLS = {"save_adapter": 10, "save_merged": 10, "checkpoint": 10, "save_full": 6, "save_adapter/rename": 6}
SEED = 1234
TEMP_PREFIXES = (".tmp-", ".old-", ".del-")

DRIVER = textwrap.dedent(r'''
    import json, os, random, signal, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(1)
    import minift
    import minift.io.files as files
    from minift.train import checkpoint as ckpt
    from safetensors.torch import load_file

    base, root, seed = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
    kills = json.loads(sys.argv[4])
    MINIFT = os.path.dirname(minift.__file__)
    TEMPS = (".tmp-", ".old-", ".del-")

    def temps(d):
        return sorted(p.name for p in d.iterdir() if p.name.startswith(TEMPS)) if d.is_dir() else []

    import contextlib, fnmatch, pathlib, posixpath, shutil
    WRITER = files.__file__  # the atomic writer: half the kill points fall while it runs
    # the standard library's Python file code runs in (rmtree, copies, paths) counts too
    STDLIB = {m.__file__ for m in (contextlib, fnmatch, os, pathlib, posixpath, shutil)}

    def in_writer(frame):
        while frame is not None:
            if frame.f_code.co_filename == WRITER:
                return True
            frame = frame.f_back
        return False

    class Counter:
        """Counts line events in minift's code and the stdlib's file code ("all"), and those run
        while the atomic writer's own code is on the stack ("writer"); SIGKILLs this process at
        line `kill_at` = (which count, number)."""
        def __init__(self, kill_at=None):
            self.n = {"all": 0, "writer": 0}
            self.kill_at = kill_at
        def glob(self, frame, event, arg):
            f = frame.f_code.co_filename
            return self.local if f.startswith(MINIFT) or f in STDLIB else None
        def local(self, frame, event, arg):
            if event == "line":
                self.n["all"] += 1
                if in_writer(frame):
                    self.n["writer"] += 1
                if self.kill_at is not None and self.n[self.kill_at[0]] == self.kill_at[1]:
                    os.kill(os.getpid(), signal.SIGKILL)
            return self.local

    def traced(fn, kill_at=None):
        c = Counter(kill_at)
        sys.settrace(c.glob)
        try:
            fn()
        finally:
            sys.settrace(None)
        return c.n

    def versions_of(model):
        """Two states of the trainable tensors: the writes alternate between them."""
        out = []
        for v in range(2):
            g = torch.Generator().manual_seed(100 + v)
            out.append({n: torch.randn(p.shape, generator=g) * 0.05 for n, p in model.named_parameters() if p.requires_grad})
        return out

    def set_version(model, vs, v):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in vs[v]:
                    p.copy_(vs[v][n].to(p.dtype))

    def lora_model():
        m, _ = minift.load(base)
        minift.add_lora(m, r=4, alpha=8, targets=["q_proj", "v_proj", "down_proj"])
        return m

    # ---- one writer: write(v) writes version v; state(dest) says which version is there -----------
    def setup(kind):
        d = root / kind.replace("/", "-")
        d.mkdir()
        files._renameat2 = False if kind.endswith("/rename") else None  # None: detected again
        if kind.startswith("save_adapter"):
            m = lora_model(); vs = versions_of(m); dest = d / "adapter"
            def write(v):
                set_version(m, vs, v); m.save_adapter(dest, overwrite=True)
            def state(_):
                if not dest.exists():
                    return "absent"
                sd = load_file(str(dest / "adapter_model.safetensors"))
                fresh, _ = minift.load(base)
                minift.load_adapter(fresh, dest)  # loadable, and strict: config and tensors agree
                got = {n: p.detach() for n, p in fresh.named_parameters() if p.requires_grad}
                for v in range(2):
                    if all(torch.equal(got[n], vs[v][n]) for n in vs[v]):
                        return v
                raise AssertionError(f"{dest}: adapter is neither version")
            return dest, d, write, state
        if kind == "save_merged":
            m = lora_model(); vs = versions_of(m); dest = d / "merged"
            def write(v):
                set_version(m, vs, v); m.save_merged(dest, torch.float32, overwrite=True, max_shard_size="60KB")
            expected = {}
            def state(_):
                if not dest.exists():
                    return "absent"
                loaded, _ = minift.load(dest)
                q = loaded.model.layers[1].self_attn.q_proj.weight.detach()
                d_ = loaded.model.layers[0].mlp.down_proj.weight.detach()
                for v, (eq, ed) in expected.items():
                    if torch.equal(q, eq) and torch.equal(d_, ed):
                        return v
                raise AssertionError(f"{dest}: merged checkpoint is neither version (a mix of shards?)")
            def record(v):
                loaded, _ = minift.load(dest)
                expected[v] = (loaded.model.layers[1].self_attn.q_proj.weight.detach().clone(),
                               loaded.model.layers[0].mlp.down_proj.weight.detach().clone())
            write.record = record
            return dest, d, write, state
        if kind == "save_full":
            m, tok = minift.load(base, full_finetuning=True); vs = versions_of(m); dest = d / "final"
            def write(v):
                set_version(m, vs, v); ckpt.save_full(m, None, dest)
            def state(_):
                if not dest.exists():
                    return "absent"
                loaded, _ = minift.load(dest)
                got = dict(loaded.named_parameters())
                for v in range(2):
                    if all(torch.equal(got[n], vs[v][n]) for n in vs[v] if n in got):
                        return v
                raise AssertionError(f"{dest}: full checkpoint is neither version")
            return dest, d, write, state
        # the trainer's checkpoint-N: each write the next step, save_total_limit=1 (so pruning runs too);
        # a killed child's step is written again by the next write (re-saving a step replaces it)
        m = lora_model(); vs = versions_of(m); out = d / "run"; out.mkdir()
        params = [p for p in m.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-3)
        for p in params:
            p.grad = torch.ones_like(p)
        opt.step()
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        step = [0]
        def write(v):
            set_version(m, vs, v)
            step[0] += 1
            ckpt.save_checkpoint(out, step[0], m, opt, sched, {"version": v}, total_limit=1)
        def state(_):
            found = []
            for p in sorted(out.iterdir()):
                if not p.name.startswith("checkpoint-"):
                    continue
                st = json.loads((p / ckpt.STATE_FILE).read_text())  # a visible checkpoint is complete
                v = st["version"]
                assert st["step"] == int(p.name.split("-")[1]), p
                sd = load_file(str(p / "trainable.safetensors"))
                assert all(torch.equal(sd[n], vs[v][n]) for n in vs[v]), f"{p}: trainable tensors of no version"
                torch.load(p / "optimizer.pt", weights_only=True)
                load_file(str(p / "rng.safetensors"))
                json.loads((p / "scheduler.json").read_text())
                fresh, _ = minift.load(base)
                minift.load_adapter(fresh, p / "adapter")
                found.append(v)
            assert found, f"{out}: no complete checkpoint left"
            return found[-1] if len(found) == 1 else found
        return out / "checkpoint-x", out, write, state

    results = {}
    for kind, n_kills in kills.items():
        dest, parent, write, state = setup(kind)
        rows = []
        try:
            write(1)
            if hasattr(write, "record"):
                write.record(1)
            n = traced(lambda: write(0))  # lines in one overwriting save
            if hasattr(write, "record"):
                write.record(0)
            rng = random.Random(seed + len(kind))
            half = n_kills // 2
            points = [("all", k) for k in sorted(rng.sample(range(1, n["all"] + 1), n_kills - half))]
            points += [("writer", k) for k in sorted(rng.sample(range(1, n["writer"] + 1), half - 1))]
            points.append(("writer", n["writer"] - rng.randrange(1, 16)))  # one in the swap at the end
            current = 0
            for i, k in enumerate(points):
                new = 1 - current
                if kind != "checkpoint" and i % 4 == 3:  # sometimes the destination does not exist yet
                    files.remove_dir(dest)
                before = state(None)
                pid = os.fork()
                if pid == 0:
                    try:
                        traced(lambda: write(new), kill_at=k)
                    finally:
                        os._exit(0)
                _, status = os.waitpid(pid, 0)
                killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
                row = {"k": k, "of": n[k[0]], "killed": killed, "before": before}
                try:
                    after = state(None)
                    row["after"] = after
                    row["left"] = temps(parent)
                    # a checkpoint's state() itself checks that every visible checkpoint is complete
                    ok = kind == "checkpoint" or after in (before, new)
                    if after == "absent" and kind.endswith("/rename"):  # killed between the two renames:
                        files.remove_stale(parent)  # what the next write does first puts it back
                        ok = state(None) == before
                    assert ok, f"after a kill the destination holds {after!r}; before it held {before!r}, the write was {new}"
                    write(new)  # the next write into the same directory
                    current = new
                    assert not temps(parent), f"temporaries left after the next write: {temps(parent)}"
                    final = state(None)
                    assert final == new, f"after the next write the destination holds {final!r}, not {new}"
                    extra = sorted(p.name for p in parent.iterdir() if p.name != dest.name and not p.name.startswith("checkpoint-"))
                    assert not extra, f"unexpected entries beside the destination: {extra}"
                except Exception as e:
                    row["error"] = f"{type(e).__name__}: {e}"
                rows.append(row)
        except Exception as e:
            rows.append({"error": f"setup: {type(e).__name__}: {e}"})
        results[kind] = rows
    print("RESULTS " + json.dumps(results))
''')


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_tiny_checkpoint(tmp_path_factory.mktemp("crash") / "llama", "llama", tie_word_embeddings=False)


@pytest.fixture(scope="module")
def kill_results(base, tmp_path_factory):
    root = tmp_path_factory.mktemp("kills")
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    r = subprocess.run([sys.executable, "-c", DRIVER, str(base), str(root), str(SEED), json.dumps(KILLS)],
                       env=env, capture_output=True, text=True, timeout=600)
    line = next((ln for ln in r.stdout.splitlines() if ln.startswith("RESULTS ")), None)
    assert r.returncode == 0 and line, f"driver failed (rc {r.returncode}):\n{r.stdout[-3000:]}\n{r.stderr[-5000:]}"
    return json.loads(line[len("RESULTS "):])


@pytest.mark.parametrize("writer", list(KILLS))
def test_sigkill_leaves_destination_absent_or_complete(kill_results, writer):
    rows = kill_results[writer]
    errors = [r for r in rows if "error" in r]
    assert not errors, json.dumps(errors, indent=1)
    assert len(rows) == KILLS[writer]
    # a write into an absent destination runs fewer lines than the overwrite the points were drawn on
    assert sum(r["killed"] for r in rows) >= len(rows) // 2
    assert any(r["left"] for r in rows), "no kill fell mid-write (nothing was left to clean up)"


# ---- a full disk --------------------------------------------------------------------------------------


def _snapshot(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _temps(d: Path) -> list[str]:
    return [p.name for p in d.iterdir() if p.name.startswith(TEMP_PREFIXES)]


@pytest.fixture
def disk_full(monkeypatch):
    """Makes the n-th file write (safetensors or text) write half its bytes, then fail with ENOSPC."""
    import safetensors.torch

    real_save, real_text = safetensors.torch.save_file, Path.write_text
    calls = {"n": 0, "fail_at": 1}

    def failing(path: str, data: bytes):
        calls["n"] += 1
        if calls["n"] == calls["fail_at"]:
            with open(path, "wb") as f:
                f.write(data[: len(data) // 2])
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    def save_file(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        failing(filename, Path(filename).read_bytes())

    def write_text(self, data, *a, **kw):
        out = real_text(self, data, *a, **kw)
        failing(str(self), data.encode())
        return out

    def arm(fail_at: int):
        calls.update(n=0, fail_at=fail_at)
        monkeypatch.setattr(safetensors.torch, "save_file", save_file)
        monkeypatch.setattr(Path, "write_text", write_text)

    def disarm():
        monkeypatch.setattr(safetensors.torch, "save_file", real_save)
        monkeypatch.setattr(Path, "write_text", real_text)

    return arm, disarm


def _writers(base: Path, tmp: Path):
    lora, _ = minift.load(base)
    minift.add_lora(lora, r=4)
    full, _ = minift.load(base, full_finetuning=True)
    params = [p for p in lora.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    (tmp / "run").mkdir()
    return {
        "save_adapter": (tmp / "ad", lambda: lora.save_adapter(tmp / "ad", overwrite=True)),
        "save_merged": (tmp / "m", lambda: lora.save_merged(tmp / "m", overwrite=True, max_shard_size="100KB")),
        "checkpoint": (tmp / "run" / "checkpoint-1",
                       lambda: ckpt.save_checkpoint(tmp / "run", 1, lora, opt, sched, {"x": 1})),
        "save_full": (tmp / "final", lambda: ckpt.save_full(full, None, tmp / "final")),
    }


@pytest.mark.parametrize("fail_at", [1, 2, 3])
def test_full_disk_is_a_clear_error_and_keeps_the_previous_files(base, tmp_path, disk_full, fail_at):
    arm, disarm = disk_full
    for name, (dest, write) in _writers(base, tmp_path).items():
        write()
        before = _snapshot(dest)
        arm(fail_at)
        with pytest.raises(WriteError) as info:
            write()
        disarm()
        msg = str(info.value)
        assert isinstance(info.value, MiniftError) and isinstance(info.value, OSError), name
        assert "No space left on device" in msg and str(dest) in msg and "unchanged" in msg, msg
        assert _snapshot(dest) == before, f"{name}: the previous files changed"
        assert not _temps(dest.parent), f"{name}: temporaries left: {_temps(dest.parent)}"


def test_full_disk_on_a_first_write_leaves_nothing(base, tmp_path, disk_full):
    arm, disarm = disk_full
    model, _ = minift.load(base)
    minift.add_lora(model, r=4)
    arm(1)
    with pytest.raises(WriteError, match="nothing was written"):
        model.save_adapter(tmp_path / "ad")
    disarm()
    assert list(tmp_path.iterdir()) == []


def test_stale_temps_only_of_dead_writers_are_removed(base, tmp_path):
    """A temporary whose writer is alive (another save in progress) is left alone; a dead writer's
    is removed by the next write; a `.old-` copy whose destination is missing is restored."""
    model, _ = minift.load(base)
    minift.add_lora(model, r=4)
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
        dead_pid = int(dead.stdout)
        (tmp_path / f".tmp-other-pid{live.pid}-0123abcd").mkdir()
        (tmp_path / f".tmp-ad-pid{dead_pid}-0123abcd").mkdir()
        old = tmp_path / f".old-prev-pid{dead_pid}-89abcdef"
        old.mkdir()
        (old / "adapter_config.json").write_text("{}")
        model.save_adapter(tmp_path / "ad")
        names = sorted(p.name for p in tmp_path.iterdir())
        assert names == sorted([f".tmp-other-pid{live.pid}-0123abcd", "ad", "prev"]), names
    finally:
        live.kill()
        live.wait()


def test_modes_and_manifest(base, tmp_path):
    model, _ = minift.load(base)
    minift.add_lora(model, r=4)
    old = os.umask(0o027)
    try:
        out = model.save_adapter(tmp_path / "ad")
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == 0o750
    for f in out.iterdir():
        assert (f.stat().st_mode & 0o777) == 0o640, f  # safetensors alone would write 0600
    listed = json.loads((out / ".minift-files.json").read_text())["files"]
    assert set(listed) == {f.name for f in out.iterdir()} - {".minift-files.json"}
    model.save_adapter(tmp_path / "ad2")
    assert (tmp_path / "ad2" / "adapter_model.safetensors").stat().st_mode & 0o777 == 0o666 & ~old
