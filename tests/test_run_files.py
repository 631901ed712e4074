"""Every file searchllm reads back is checked, every write is atomic: a damaged or unwritable file gives one
line naming it and what to do, and the files already there stay as they were."""

import errno
import json
import os
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from searchllm.config import ConfigError, load_config
from searchllm.export.formats import ExportDirError, ExportJob, check_export_dir, write_all
from searchllm.pruning.levels import LayerLevels, load_layers, save_layer
from searchllm.pruning.reform import LayerResult
from searchllm.pruning.scores import Scores
from searchllm.rundir import RunDir, RunFileError

from conftest import tiny_model


def one_line(e) -> str:
    text = str(e.value)
    assert "\n" not in text
    return text


def cut(path, keep=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


@pytest.fixture
def run(tmp_path):
    return RunDir(tmp_path / "run").create()


def scores():
    z = np.zeros((2, 3), np.float32)
    return Scores(z, z, z, z, z, z, z)


def layer_result(i=0):
    return LayerResult(i, {"down": torch.ones(4, 3)}, {"down": 0.5}, {"down": 0.1}, 1.0)


def level_entry(i=0):
    return LayerLevels(
        i, [1, 0], [2, 0, 1], {1: torch.ones(4, 2)}, {2: torch.ones(4, 2)}, [1.0, 0.5, 0.0], [1.0, 0.3, 0.1, 0.0]
    )


# -- damaged files ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_a_damaged_checkpoint_names_itself_and_offers_the_previous_generation(run, damage):
    run.save_checkpoint({"generation": 0, "parents": []})
    run.save_checkpoint({"generation": 1, "parents": []})
    p = run.path / "checkpoint.json"
    cut(p) if damage == "truncated" else p.write_bytes(b"\x00\xffnot json")
    with pytest.raises(RunFileError) as e:
        run.load_checkpoint()
    msg = one_line(e)
    assert str(p) in msg and "damaged" in msg and "checkpoint.prev.json" in msg
    assert json.loads((run.path / "checkpoint.prev.json").read_text())["generation"] == 0  # the fallback is intact


def test_a_damaged_first_checkpoint_says_how_to_restart_the_search(run):
    (run.path / "checkpoint.json").write_text('{"generation": 0, "par')
    with pytest.raises(RunFileError, match="delete it to restart the search from generation 0"):
        run.load_checkpoint()


def test_a_cut_last_line_of_the_evaluation_log_is_dropped_and_the_log_stays_appendable(run):
    rec = lambda k: {"key": k, "genes": b"\x01\x02", "ppl": 3.0}  # noqa: E731
    run.append_eval(rec("a"))
    run.append_eval(rec("b"))
    with open(run.path / "evals.jsonl", "a") as f:
        f.write('{"key": "c", "gen')  # the kill came mid-write
    assert sorted(run.load_evals()) == ["a", "b"]
    run.append_eval(rec("c"))
    assert sorted(run.load_evals()) == ["a", "b", "c"]
    assert all(json.loads(line) for line in (run.path / "evals.jsonl").read_text().splitlines())


def test_a_damaged_line_inside_the_evaluation_log_is_named(run):
    run.append_eval({"key": "a", "genes": b"\x01", "ppl": 3.0})
    (run.path / "evals.jsonl").write_text("garbage\n" + (run.path / "evals.jsonl").read_text())
    with pytest.raises(RunFileError) as e:
        run.load_evals()
    assert "line 1 of 2" in one_line(e) and "evals.jsonl" in one_line(e)


def test_a_truncated_archive_generation_is_named_and_the_log_still_has_its_evaluations(run):
    run.write_generation(0, [{"key": "a", "ppl": 1.0}])
    run.write_generation(1, [{"key": "b", "ppl": 2.0}])
    cut(run.path / "archive" / "gen-0001.parquet")
    with pytest.raises(RunFileError) as e:
        run.archive()
    assert "gen-0001.parquet is damaged" in one_line(e) and "evals.jsonl" in one_line(e)


def test_missing_scores_mean_calibrate_again_and_damaged_ones_are_named(run):
    assert run.load_scores() is None
    run.save_scores(scores())
    assert run.load_scores() is not None
    cut(run.path / "scores.npz")
    with pytest.raises(RunFileError, match="scores.npz is damaged .*delete it to calibrate again"):
        run.load_scores()


def test_a_truncated_reformation_layer_is_named_with_how_to_recompute_it(run):
    run.save_layer("best-abc", layer_result(0))
    run.save_layer("best-abc", layer_result(1))
    cut(run.path / "reform" / "best-abc" / "layer-0001.pt")
    with pytest.raises(RunFileError) as e:
        run.load_layers("best-abc")
    assert "layer-0001.pt is damaged" in one_line(e) and "rm " in one_line(e)


def test_a_truncated_level_database_layer_is_named_with_how_to_rebuild_it(tmp_path):
    save_layer(tmp_path, level_entry(0))
    save_layer(tmp_path, level_entry(1))
    assert sorted(load_layers(tmp_path)) == [0, 1]
    cut(tmp_path / "layer-0001.safetensors", 0.3)
    with pytest.raises(RunFileError, match="layer-0001.safetensors is damaged .*build that layer again"):
        load_layers(tmp_path)


def test_a_damaged_manifest_is_named(run):
    run.save_json("manifest.json", {"a": 1})
    cut(run.path / "manifest.json")
    with pytest.raises(RunFileError, match="manifest.json is damaged"):
        run.load_json("manifest.json")


def exported(tmp_path):
    from searchllm.export.hf import build
    from searchllm.models.adapters import adapter_for
    from searchllm.models.sliced import LayerSlice

    model = tiny_model("llama", layers=2)
    adapter = adapter_for(model.config)
    out, info = build(adapter, model.state_dict(), [LayerSlice.full(adapter.geometry())] * 2)
    return out, info


def test_a_truncated_export_weight_file_gives_one_line_from_evaluate(tmp_path):
    from searchllm.export.hf import save

    out, info = exported(tmp_path)
    save(out, info, tmp_path / "export")
    cut(tmp_path / "export" / "model.safetensors")
    proc = subprocess.run(
        [sys.executable, "-m", "searchllm.evaluate", str(tmp_path / "export"), "eval.tasks=[]"],
        capture_output=True,
        text=True,
        timeout=300,
        env=os.environ | {"HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert (
        len(lines) == 1
        and "is damaged" in lines[0]
        and "export it again" in lines[0]
        and "Traceback" not in proc.stderr
    )


@pytest.mark.parametrize(
    "content,kind", [("- a\n- b\n", "list"), ("just a string\n", "str"), ("a: [1, 2\n", "invalid")]
)
def test_a_config_file_that_is_not_a_mapping_is_refused_without_quoting_it(tmp_path, content, kind):
    f = tmp_path / "c.yaml"
    f.write_text(content)
    with pytest.raises(ConfigError) as e:
        load_config(["--config", str(f)])
    msg = one_line(e)
    assert str(f) in msg and content.strip() not in msg
    assert ("not valid YAML" in msg) if kind == "invalid" else ("not a mapping" in msg)


def test_an_empty_window_length_list_with_corpora_is_refused_up_front():
    with pytest.raises(ConfigError, match="eval.lengths=\\[\\]"):
        load_config(["eval.lengths=[]"])
    assert load_config(["eval.corpora=[]", "eval.lengths=[]"]).eval.corpora == []


# -- full disks ----------------------------------------------------------------------------------------------


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


@pytest.mark.parametrize("writer", ["checkpoint", "archive", "scores", "reform layer", "level layer", "manifest"])
def test_a_full_disk_gives_a_clear_error_and_keeps_the_previous_file(run, monkeypatch, writer):
    import builtins

    import safetensors.torch

    steps = {
        "checkpoint": (
            lambda: run.save_checkpoint({"generation": 0}),
            run.path / "checkpoint.json",
            (builtins, "open"),
        ),
        "archive": (
            lambda: run.write_generation(0, [{"key": "a"}]),
            run.path / "archive" / "gen-0000.parquet",
            (pd.DataFrame, "to_parquet"),
        ),
        "scores": (lambda: run.save_scores(scores()), run.path / "scores.npz", (np, "savez")),
        "reform layer": (
            lambda: run.save_layer("t", layer_result()),
            run.path / "reform" / "t" / "layer-0000.pt",
            (torch, "save"),
        ),
        "level layer": (
            lambda: save_layer(run.path / "levels", level_entry()),
            run.path / "levels" / "layer-0000.safetensors",
            (safetensors.torch, "save_file"),
        ),
        "manifest": (lambda: run.save_json("manifest.json", {"a": 1}), run.path / "manifest.json", (builtins, "open")),
    }
    write, path, (owner, name) = steps[writer]
    write()
    before = path.read_bytes()
    monkeypatch.setattr(owner, name, enospc)
    with pytest.raises(RunFileError) as e:
        write()
    monkeypatch.undo()
    assert "no space left on device" in one_line(e) and "intact" in one_line(e)
    assert path.read_bytes() == before and not [p for p in path.parent.iterdir() if ".tmp" in p.name]


def test_a_full_disk_during_the_export_replaces_nothing(tmp_path, monkeypatch):
    out, info = exported(tmp_path)
    job = ExportJob(out, info, tmp_path / "export", None, torch.zeros(1, 8, dtype=torch.long))
    write_all(job, "hf")
    before = (tmp_path / "export" / "model.safetensors").read_bytes()
    monkeypatch.setattr(type(out), "save_pretrained", enospc)
    with pytest.raises(RunFileError, match="cannot write the export .*nothing was replaced"):
        write_all(job, "hf")
    monkeypatch.undo()
    assert (tmp_path / "export" / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".export")] == []


# -- the export dir and the run lock ---------------------------------------------------------------------


def test_an_export_dir_holding_a_users_files_is_refused_unless_overwrite(tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(ExportDirError, match="exists and is not a searchllm export.*export.overwrite=true"):
        check_export_dir(mine, overwrite=False)
    check_export_dir(mine, overwrite=True)
    check_export_dir(tmp_path / "new", overwrite=False)


def test_a_second_driver_on_a_locked_run_dir_is_told_who_holds_it(run):
    import socket

    with run.locked():
        with pytest.raises(RunFileError) as e:
            with run.locked():
                pass
        msg = one_line(e)
        assert f"pid {os.getpid()}" in msg and socket.gethostname() in msg
    assert not (run.path / "lock").exists()  # released on exit
    with run.locked():
        pass


def test_a_lock_left_by_a_crashed_driver_is_taken_over(run):
    import socket

    dead = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    (run.path / "lock").write_text(json.dumps({"pid": int(dead), "host": socket.gethostname(), "since": "then"}))
    with run.locked():
        assert json.loads((run.path / "lock").read_text())["pid"] == os.getpid()
