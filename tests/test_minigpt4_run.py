"""configs/easyvqa_minigpt4_tiny.py end to end: the MiniGPT-4-shaped backbone shipped with the repository
(EVA-style ViT, Q-Former, llama_proj, tiny LLaMA, MiniGPT-4's template), two rounds of FedNano."""

import json

from conftest import run_main
from test_default_run import AVERAGE_TOLERANCE, CELL_TOLERANCE, readme_table


def test_minigpt4_tiny_runs_from_the_shipped_backbone_and_tuning_beats_untuned(easy_vqa_dir, tmp_path):
    result = run_main(f"--config.data.dir={easy_vqa_dir}", f"--config.pretrain.cache_dir={tmp_path / 'cache'}",
                      f"--workdir={tmp_path / 'run'}", "--config.fed.rounds=2", "--config.fed.methods=fednano",
                      config="configs/easyvqa_minigpt4_tiny.py")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Using the pretrained backbone shipped with the repository" in result.stdout
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    untuned, tuned = results["results"]["Untuned"], results["results"]["FedNano"]
    assert tuned["average"] > untuned["average"] + 0.05, (untuned["average"], tuned["average"])
    # The README's MiniGPT-4 table starts from this backbone: its untuned row is this run's.
    readme = readme_table(section="## Measured results: a MiniGPT-4-shaped backbone")["Untuned"]
    got = [100 * a for a in untuned["accuracy"]] + [100 * untuned["average"]]
    assert all(abs(a - b) <= CELL_TOLERANCE for a, b in zip(got[:-1], readme[:-1])), (got, readme)
    assert abs(got[-1] - readme[-1]) <= AVERAGE_TOLERANCE, (got, readme)
