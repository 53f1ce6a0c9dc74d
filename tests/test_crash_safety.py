"""Training runs survive kills, signals and divergence: nothing lost, ``--resume`` bit-identical.

The SIGKILL chains run ``peftlab train`` in child processes forked from a forkserver that has
imported peftlab once (``python -m peftlab`` is ``sys.exit(main(argv))``, as ``_cli`` here; the
preload saves the seconds of importing torch and transformers per kill). SIGTERM and the second
SIGINT go to real ``python -m peftlab`` processes.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peftlab.cli import main
from peftlab.config import TrainConfig
from peftlab.errors import UserError
from peftlab.outputs import RunFolder
from peftlab.training import checkpoint as ckpt
from peftlab.training import loop
from peftlab.training.loop import Interrupted, train
from helpers import expect_error, losses, write_dialogues

STEPS = 40
KILLS_PER_METHOD = 10
METHOD_OPTIONS = {"full": [], "lora": ["--method", "lora", "--rank", "4", "--dropout", "0.1", "--lr", "5e-3"]}
FINAL_FILE = {"full": "model.safetensors", "lora": "adapter_model.safetensors"}


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dialogues(tmp_path_factory.mktemp("data") / "d.jsonl", n=40)


def _args(model_dir, data, out, method="full", steps=STEPS) -> list[str]:
    return ["train", "--model", str(model_dir), "--data", str(data), "--out", str(out), "--max-steps", str(steps),
            "--batch-size", "2", "--save-every", "1", "--device", "cpu", "--eval-limit", "4", *METHOD_OPTIONS[method]]


def _config(model_dir, data, out, method="full", steps=STEPS, **options) -> TrainConfig:
    from peftlab.cli import parse

    config, _ = parse(_args(model_dir, data, out, method, steps))
    return TrainConfig(**{**config.__dict__, **options})


def _same_weights(a: Path, b: Path, method: str) -> bool:
    x, y = load_file(a / "final" / FINAL_FILE[method]), load_file(b / "final" / FINAL_FILE[method])
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def _cli(argv: list[str], log: str) -> None:
    """A child process: ``python -m peftlab ARGV`` with stdout and stderr into ``log``."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.exit(main(argv))


@pytest.fixture(scope="module")
def forkserver():
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["peftlab.cli", "peftlab.training.loop", "test_crash_safety"])
    return context


def _complete(run: Path) -> set[str]:
    return {p.name for p in ckpt.complete_checkpoints(run / "checkpoints")} if (run / "checkpoints").is_dir() else set()


def _newest(run: Path) -> int:
    """The step of the newest complete checkpoint (0: none)."""
    return max((int(name[5:]) for name in _complete(run)), default=0)


def _kill_at_a_moment(child, run: Path, moment: str, rng: random.Random) -> bool:
    """SIGKILL ``child`` at ``moment``; False when it finished first.

    start    a random moment in its first half second (loading, or restoring a checkpoint)
    step     a random moment within about a step after its k-th new checkpoint (k random in 1..3)
    write    while it writes its checkpoint after the k-th new one (a ``.tmp`` folder; if the poll misses
             it: once that checkpoint is complete, while older ones are deleted)
    end      once the last step's checkpoint exists: during the final validation loss or while writing final/
    """
    first, ckpts, started = _newest(run), run / "checkpoints", time.monotonic()
    k, delay = rng.randint(1, 3), rng.uniform(0.0, 0.5 if moment == "start" else 0.15)
    reached = None  # when the k-th new checkpoint was seen
    while child.is_alive():
        new = _newest(run) - first
        if new >= k and reached is None:
            reached = time.monotonic()
        if moment == "start":
            due = time.monotonic() - started >= delay
        elif moment == "step":
            due = reached is not None and time.monotonic() - reached >= delay
        elif moment == "write":
            writing = ckpts.is_dir() and any(p.suffix == ".tmp" for p in ckpts.glob(".step-*"))
            due = reached is not None and (writing or new > k)
        else:
            due = _newest(run) == STEPS or (run / ".final.tmp").exists()
        if due:
            os.kill(child.pid, signal.SIGKILL)
            child.join()
            return True
        time.sleep(0.002)
    return False


@pytest.mark.parametrize("method", ["full", "lora"])
def test_sigkill_at_random_moments_then_resume_is_bit_identical(method, tiny_llama_dir, data, tmp_path, forkserver):
    """KILLS_PER_METHOD kills, each followed by ``--resume``; a chain that finishes before its next planned kill
    (a busy machine polls late) is checked like any other and a new chain takes the kills that are left."""
    reference = train(_config(tiny_llama_dir, data, tmp_path / "reference", method))
    log = str(tmp_path / "log.txt")
    rng = random.Random(f"issue-19-{method}")
    pending = ["start"] + rng.choices(["step", "write"], weights=[3, 2], k=KILLS_PER_METHOD - 2) + ["end"]
    kills, chain = 0, 0
    while pending:
        chain += 1
        assert chain <= 4, f"{len(pending)} kills never landed: the runs kept finishing first"
        run = tmp_path / f"run-{chain}"
        while True:
            moment = pending.pop(0) if pending else None
            argv = _args(tiny_llama_dir, data, run, method) + (["--resume"] if run.exists() else [])  # else: killed before
            child = forkserver.Process(target=_cli, args=(argv, log))
            child.start()
            if moment is not None and _kill_at_a_moment(child, run, moment, rng):
                kills += 1
                assert len(_complete(run)) <= 3  # the newest two, and a new one whose older ones were not yet deleted
                continue
            if moment is not None:
                pending.insert(0, moment)  # it finished first: the next chain gets this kill
            child.join()
            assert child.exitcode == 0, Path(log).read_text()[-3000:]
            break
        _check_finished_chain(run, reference.run_dir, method)
    assert kills == KILLS_PER_METHOD


def _check_finished_chain(run: Path, reference: Path, method: str) -> None:
    assert _same_weights(reference, run, method)
    assert losses(run) == losses(reference)  # every step logged once, with the same loss
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "loss" in r] == list(range(1, STEPS + 1))
    assert [r["step"] for r in records if "eval_loss" in r] == [STEPS]
    info, straight = (json.loads((d / "run.json").read_text()) for d in (run, reference))
    assert info["status"] == "finished" and info["result"]["train_loss"] == straight["result"]["train_loss"]
    assert _complete(run) == {ckpt.checkpoint_name(STEPS - 1), ckpt.checkpoint_name(STEPS)}
    assert not list((run / "checkpoints").glob(".*")) and not (run / ".final.tmp").exists()


def _python_m_peftlab(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "peftlab", *argv], env={**os.environ, "HF_HUB_OFFLINE": "1"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for_step(run: Path, child: subprocess.Popen, step: int) -> None:
    metrics = run / "metrics.jsonl"
    while child.poll() is None and not (metrics.exists() and metrics.read_text().count('"loss"') >= step):
        time.sleep(0.01)
    assert child.poll() is None, child.communicate()


def test_sigterm_saves_the_current_step_and_resume_is_bit_identical(tiny_llama_dir, data, tmp_path):
    reference = train(_config(tiny_llama_dir, data, tmp_path / "reference", steps=60, save_every=0))
    run = tmp_path / "run"
    argv = _args(tiny_llama_dir, data, run, steps=60)
    argv[argv.index("--save-every") + 1] = "0"  # no periodic checkpoints: the signal's is the only one
    child = _python_m_peftlab(argv)
    _wait_for_step(run, child, 3)
    child.send_signal(signal.SIGTERM)
    _, err = child.communicate(timeout=300)
    assert child.returncode == 143, err
    message = err.strip().splitlines()[-1]
    step = int(message.split("after step ")[1].split()[0])
    assert message.startswith("peftlab: stopped by SIGTERM") and "--resume" in message and "Traceback" not in err
    assert _complete(run) == {ckpt.checkpoint_name(step)} and 3 <= step < 60
    assert json.loads((run / "run.json").read_text())["status"] == "running" and not (run / "final").exists()
    resumed = train(_config(tiny_llama_dir, data, run, steps=60, save_every=0, resume=True))
    assert _same_weights(reference.run_dir, resumed.run_dir, "full")
    assert losses(run) == losses(reference.run_dir)


def _two_signals(signum: int, log: str) -> None:
    """A child process: the first signal is a stop request, the second ends it at once."""
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 2)
    with loop.StopRequests() as stop:
        os.kill(os.getpid(), signum)
        time.sleep(0.05)  # the handler runs between two bytecodes
        assert stop.signum == signum
        os.kill(os.getpid(), signum)
        time.sleep(60)
    sys.exit(0)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_second_signal_exits_at_once(signum, tmp_path, forkserver):
    log = tmp_path / "log.txt"
    child = forkserver.Process(target=_two_signals, args=(signum, str(log)))
    child.start()
    child.join(timeout=60)
    name = signal.Signals(signum).name
    assert child.exitcode == 128 + signum and f"second {name}: stopped at once" in log.read_text(), log.read_text()


class _Signal:
    """A progress factory that sends this process ``signum`` once training reaches ``at`` steps."""

    def __init__(self, signum: int, at: int) -> None:
        self.signum, self.at = signum, at

    def __call__(self, description, total, unit="it"):
        signum, at, done = self.signum, self.at, [0]

        class Bar:
            def update(self, n=1, **stats):
                done[0] += n
                if description == "training" and done[0] == at:
                    os.kill(os.getpid(), signum)

            def close(self):
                pass

        return Bar()


def test_sigint_with_the_default_save_every_keeps_the_folder_and_saves_the_step(tiny_llama_dir, data, tmp_path):
    run, handler = tmp_path / "run", signal.getsignal(signal.SIGINT)
    with pytest.raises(Interrupted) as stopped:  # formerly: the whole run folder deleted, nothing saved
        train(_config(tiny_llama_dir, data, run, steps=6, save_every=0), progress=_Signal(signal.SIGINT, 2))
    assert stopped.value.exit_code == 130 and "--resume" in str(stopped.value)
    assert signal.getsignal(signal.SIGINT) is handler  # restored
    step = int(str(stopped.value).split("after step ")[1].split()[0])
    assert _complete(run) == {ckpt.checkpoint_name(step)} and (run / "metrics.jsonl").is_file()


def test_an_interrupted_overwrite_keeps_the_old_run(tiny_llama_dir, data, tmp_path):
    old = train(_config(tiny_llama_dir, data, tmp_path / "run", steps=2))
    before = (old.run_dir / "run.json").read_bytes()
    with pytest.raises(Interrupted, match="unchanged"):
        train(_config(tiny_llama_dir, data, tmp_path / "run", steps=6, overwrite=True),
              progress=_Signal(signal.SIGTERM, 1))
    assert (old.run_dir / "run.json").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # no staging folder left


def test_stale_staging_folders_of_killed_runs_are_cleaned_up(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    out = tmp_path / "run"
    (out / "final").mkdir(parents=True)
    (out / "run.json").write_text("{}")
    for name in (f".run.partial-{dead.pid}", f".run.old-{dead.pid}", f".run.partial-{os.getppid()}"):
        (tmp_path / name / "checkpoints").mkdir(parents=True)
    RunFolder.prepare(out, overwrite=True, resume=False).abandon()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".run.partial-{os.getppid()}", "run"]  # a live PID's stays
    # killed between the two renames of commit: the old run is put back
    os.replace(out, tmp_path / f".run.old-{dead.pid}")
    RunFolder.prepare(out, overwrite=True, resume=False).abandon()
    assert (out / "run.json").read_text() == "{}"


def test_keep_checkpoints_holds_at_most_k_and_a_kill_during_deletion_stays_resumable(tiny_llama_dir, data, straight,
                                                                                      tmp_path, monkeypatch):
    seen, save = [], ckpt.save_checkpoint

    def watched_save(folder, *args, **kwargs):
        path = save(folder, *args, **kwargs)
        seen.append(sorted(p.name for p in ckpt.complete_checkpoints(folder)))
        return path

    monkeypatch.setattr(ckpt, "save_checkpoint", watched_save)
    run = tmp_path / "run"
    train(_config(tiny_llama_dir, data, run, steps=8, keep_checkpoints=3))
    assert len(seen) == 8 and max(map(len, seen)) == 3 and seen[-1] == ["step-000006", "step-000007", "step-000008"]
    seen.clear()

    # a kill while deleting the oldest checkpoint: the rmtree stops after one file
    rmtree, calls = ckpt.shutil.rmtree, [0]

    def killed_rmtree(path, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            next(p for p in Path(path).iterdir()).unlink()
            raise KeyboardInterrupt
        rmtree(path, *args, **kwargs)

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed_rmtree)
    run = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        train(_config(tiny_llama_dir, data, run, steps=8))
    assert all(len(names) <= 2 for names in seen)
    assert list((run / "checkpoints").glob(".step-*.deleting"))  # half deleted, out of sight
    monkeypatch.setattr(ckpt.shutil, "rmtree", rmtree)
    resumed = train(_config(tiny_llama_dir, data, run, steps=8, resume=True))
    assert all(len(names) <= 2 for names in seen)
    assert _same_weights(straight.run_dir, resumed.run_dir, "full") and losses(run) == losses(straight.run_dir)
    assert not list((run / "checkpoints").glob(".*"))


def test_a_diverging_run_stops_at_the_step_and_keeps_the_last_good_checkpoint(tiny_llama_dir, data, tmp_path, capsys):
    run = tmp_path / "run"
    message = expect_error(_args(tiny_llama_dir, data, run, steps=6) + ["--lr", "1e30"], capsys)
    step = int(message.split("step ")[1].split(":")[0])
    assert "lower --lr" in message and "--skip-nonfinite-steps" in message and 1 < step <= 6, message
    assert f"last good checkpoint {ckpt.checkpoint_name(step - 1)}" in message
    weights = load_file(run / "checkpoints" / ckpt.checkpoint_name(step - 1) / "weights.safetensors")
    assert all(torch.isfinite(w).all() for w in weights.values()) and not (run / "final").exists()
    assert _complete(run) <= {ckpt.checkpoint_name(step - 2), ckpt.checkpoint_name(step - 1)}

    skipping = tmp_path / "skipping"
    assert main(_args(tiny_llama_dir, data, skipping, steps=6) + ["--lr", "1e30", "--skip-nonfinite-steps"]) == 0
    info = json.loads((skipping / "run.json").read_text())
    records = [json.loads(line) for line in (skipping / "metrics.jsonl").read_text().splitlines()]
    assert info["result"]["skipped_steps"] == sum(bool(r.get("skipped")) for r in records) > 0
    final = load_file(skipping / "final" / "model.safetensors")
    assert all(torch.isfinite(w).all() for w in final.values())


@pytest.mark.parametrize("lr", ["nan", "inf", "1e309", "-inf"])
def test_a_learning_rate_that_is_not_a_finite_number_is_refused(lr, tiny_llama_dir, data, tmp_path, capsys):
    message = expect_error(_args(tiny_llama_dir, data, tmp_path / "r") + [f"--lr={lr}"], capsys)
    assert "--lr must be a finite number" in message and not (tmp_path / "r").exists()


def test_out_of_memory_names_the_options_that_need_less(tiny_llama_dir, data, tmp_path, capsys, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(loop, "train_step", out_of_memory)
    message = expect_error(_args(tiny_llama_dir, data, tmp_path / "r"), capsys)
    assert all(option in message for option in ("--batch-size", "--grad-accum", "--max-length", "--method lora",
                                                "--dtype bfloat16")), message


def _files(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.rglob("*"))
            if p.is_file()}


def test_resume_of_a_finished_run_says_so_and_changes_nothing(tiny_llama_dir, data, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_args(tiny_llama_dir, data, run, steps=2)) == 0
    before = _files(run)
    message = expect_error(_args(tiny_llama_dir, data, run, steps=2) + ["--resume"], capsys)
    assert "already finished" in message and "--overwrite" in message
    assert _files(run) == before


def _interrupted_run(model_dir, data, run: Path, at: int, **options) -> None:
    with pytest.raises(Interrupted):
        train(_config(model_dir, data, run, steps=8, **options), progress=_Signal(signal.SIGTERM, at))


def test_resume_refuses_changed_settings_and_accepts_harmless_ones(tiny_llama_dir, data, tmp_path, capsys):
    run = tmp_path / "run"
    _interrupted_run(tiny_llama_dir, data, run, at=3)
    before = _files(run)
    message = expect_error(_args(tiny_llama_dir, data, run, steps=8) + ["--resume", "--lr", "1e-2", "--warmup-ratio", "0.5"],
                           capsys)
    assert "--lr 5e-05 -> 0.01" in message and "--warmup-ratio 0.05 -> 0.5" in message, message
    assert _files(run) == before
    # the method's default learning rate given explicitly, and other cadences, change nothing that trains
    assert main(_args(tiny_llama_dir, data, run, steps=8) + ["--resume", "--lr", "5e-5", "--log-every", "2",
                                                             "--keep-checkpoints", "1"]) == 0
    assert json.loads((run / "run.json").read_text())["config"]["log_every"] == 2
    assert _complete(run) == {ckpt.checkpoint_name(8)}


def test_resume_warns_about_other_versions(tiny_llama_dir, data, tmp_path):
    run = tmp_path / "run"
    _interrupted_run(tiny_llama_dir, data, run, at=2)
    info = json.loads((run / "run.json").read_text())
    assert set(info["versions"]) == {"peftlab", "torch", "transformers"}
    info["versions"]["torch"] = "1.0.0"
    (run / "run.json").write_text(json.dumps(info))
    lines = []
    train(_config(tiny_llama_dir, data, run, steps=8, resume=True), log=lines.append)
    assert any(line.startswith("warning:") and "torch 1.0.0 -> " in line for line in lines), lines
    assert any("resuming from" in line and "step-000002 (the newest complete checkpoint)" in line for line in lines)


@pytest.fixture(scope="module")
def straight(tiny_llama_dir, data, tmp_path_factory):
    """An uninterrupted run of 8 steps."""
    return train(_config(tiny_llama_dir, data, tmp_path_factory.mktemp("straight") / "run", steps=8))


@pytest.mark.parametrize("damaged", ["weights.safetensors", "optimizer.pt", "rng.pt", "state.json"])
def test_a_corrupt_checkpoint_names_its_file_and_an_older_one(damaged, tiny_llama_dir, data, straight, tmp_path, capsys):
    run = tmp_path / "run"
    _interrupted_run(tiny_llama_dir, data, run, at=4)
    file = run / "checkpoints" / "step-000004" / damaged
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])  # truncated
    message = expect_error(_args(tiny_llama_dir, data, run, steps=8) + ["--resume"], capsys)
    older = run / "checkpoints" / "step-000003"
    assert str(file) in message and f"--resume {older}" in message, message
    # as suggested: from the older one, which drops the damaged one and writes step 4 again
    assert main(_args(tiny_llama_dir, data, run, steps=8) + ["--resume", str(older)]) == 0
    assert _same_weights(straight.run_dir, run, "full") and losses(run) == losses(straight.run_dir)


def test_a_corrupt_run_json_on_resume_is_one_line(tiny_llama_dir, data, tmp_path, capsys):
    run = tmp_path / "run"
    _interrupted_run(tiny_llama_dir, data, run, at=2)
    (run / "run.json").write_text('{"status": "runn')
    message = expect_error(_args(tiny_llama_dir, data, run, steps=8) + ["--resume"], capsys)
    assert "run.json is corrupt" in message


def test_a_kill_while_writing_final_leaves_no_final_and_resumes(tiny_llama_dir, data, tmp_path, monkeypatch):
    straight = train(_config(tiny_llama_dir, data, tmp_path / "straight", steps=4))
    run = tmp_path / "run"
    method = loop.methods.get("full")

    def killed_while_saving(model, tokenizer, folder, *args):
        model.save_pretrained(folder)  # the weights, not yet the tokenizer
        raise KeyboardInterrupt

    monkeypatch.setattr(type(method), "save_final", lambda self, *args: killed_while_saving(*args))
    with pytest.raises(KeyboardInterrupt):
        train(_config(tiny_llama_dir, data, run, steps=4))
    assert not (run / "final").exists() and ckpt.checkpoint_name(4) in _complete(run)
    monkeypatch.undo()
    resumed = train(_config(tiny_llama_dir, data, run, steps=4, resume=True))
    assert resumed.steps == 4 and resumed.train_loss == straight.train_loss and resumed.tokens_per_second > 0
    assert _same_weights(straight.run_dir, run, "full") and losses(run) == losses(straight.run_dir)
    assert (run / "final" / "tokenizer.json").is_file() and not (run / ".final.tmp").exists()


def test_resume_path_that_is_not_a_checkpoint_is_one_line(tiny_llama_dir, data, tmp_path, capsys):
    run = tmp_path / "run"
    _interrupted_run(tiny_llama_dir, data, run, at=2)
    message = expect_error(_args(tiny_llama_dir, data, run, steps=8) + ["--resume", "step-000009"], capsys)
    assert "no such checkpoint folder" in message and "step-000002" in message
    with pytest.raises(UserError, match="finite"):
        TrainConfig(model="m", data="d", out="o", max_grad_norm=math.inf)
