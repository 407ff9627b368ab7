"""``infera eval`` for scaling methods: CSV columns and rows, the plot, resuming, bad options."""
from __future__ import annotations

import csv
import json

from infera.cli import main


def test_eval_writes_csv_and_plot_and_resumes(tiny_model, tmp_path, capsys):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("\n".join(json.dumps({"question": f"What is {i} + {i}?", "answer": 2 * i}) for i in range(3)))
    out = tmp_path / "out"
    argv = ["eval", "--task", f"jsonl:{tasks}", "--methods", "best_of_n,self_consistency,particle_filtering",
            "--budgets", "1,2", "--model", str(tiny_model("llama")), "--dtype", "float32",
            "--kv-cache-memory", "32MiB", "--max-tokens", "6", "--option", "step_max_tokens=3", "--out", str(out)]
    assert main(argv) == 0
    with (out / "results.csv").open() as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["method", "budget", "accuracy", "ci_low", "ci_high", "tokens", "prefill_tokens", "wall_s"]
    got = {(r[0], int(r[1])): r for r in rows[1:]}
    assert set(got) == {(m, b) for m in ("best_of_n", "self_consistency", "particle_filtering") for b in (1, 2)}
    for (method, budget), r in got.items():
        assert 0.0 <= float(r[3]) <= float(r[2]) <= float(r[4]) <= 1.0
        assert int(r[5]) > 0 and int(r[6]) > 0 and float(r[7]) >= 0
    # best-of-N and self-consistency chose from the same samples
    assert got["best_of_n", 2][5] == got["self_consistency", 2][5]
    assert (out / "accuracy.png").stat().st_size > 1000
    details = [json.loads(line) for line in (out / "details.jsonl").read_text().splitlines()]
    assert len(details) == 6 * 3
    capsys.readouterr()
    assert main(argv) == 0  # everything is there already: nothing runs again
    assert "accuracy" not in capsys.readouterr().out.split("wrote")[0]
    with (out / "results.csv").open() as f:
        assert len(list(csv.reader(f))) == 7


def test_eval_stopping_rules_add_rows_for_the_sampling_methods(tiny_model, tmp_path):
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("\n".join(json.dumps({"question": f"What is {i} + 1?", "answer": i + 1}) for i in range(2)))
    out = tmp_path / "out"
    assert main(["eval", "--task", f"jsonl:{tasks}", "--methods", "self_consistency,beam_search", "--budgets", "2",
                 "--stop", "none,first_finish", "--model", str(tiny_model("llama")), "--dtype", "float32",
                 "--kv-cache-memory", "32MiB", "--max-tokens", "6", "--option", "step_max_tokens=3",
                 "--out", str(out)]) == 0
    with (out / "results.csv").open() as f:
        methods = [r["method"] for r in csv.DictReader(f)]
    assert sorted(methods) == ["beam_search", "self_consistency", "self_consistency+first_finish"]


def test_bootstrap_interval_brackets_the_accuracy():
    from infera.eval.scaling import bootstrap_interval

    low, high = bootstrap_interval([True] * 30 + [False] * 70)
    assert 0.2 < low < 0.3 < high < 0.4
    assert bootstrap_interval([True] * 5) == (1.0, 1.0)


def test_eval_bad_options_are_one_line_errors(tmp_path, capsys):
    assert main(["eval", "--task", "gsm8k", "--out", str(tmp_path)]) == 2
    assert "unknown eval task 'gsm8k'" in capsys.readouterr().err
    assert main(["eval", "--task", "arithmetic", "--methods", "mcts", "--out", str(tmp_path)]) == 2
    assert "unknown method(s) mcts" in capsys.readouterr().err
    assert main(["eval", "--task", "arithmetic", "--budgets", "0,2", "--out", str(tmp_path)]) == 2
    assert "every budget must be >= 1" in capsys.readouterr().err
    assert main(["eval", "--task", "arithmetic", "--methods", "best_of_n", "--option", "beam_width=2",
                 "--out", str(tmp_path)]) == 2
    assert "option(s) beam_width apply to none of best_of_n" in capsys.readouterr().err
    assert main(["eval", "--task", "arithmetic", "--stop", "esc,vote", "--out", str(tmp_path)]) == 2
    assert "unknown stopping rule(s) vote" in capsys.readouterr().err
