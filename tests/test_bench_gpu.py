"""bench/gpu.py, the GPU slot's prepared script, end to end on this CPU at tiny sizes: every
section runs and writes its figure into the script's own section of a RESULTS.md, replacing an
older run's, and the file's other sections are kept as they were."""

import pytest
import torch

from bench import gpu

# > 20 s: a Ray Train fit (~10-12 s of fixed cost here) and a Ray Data inference pipeline
pytestmark = [pytest.mark.ray, pytest.mark.slow]

# The cheapest sizes that run every section (fp32: the script's default on a CPU). A resnet18
# student: a DenseNet161's first steps cost seconds of CPU here, and nothing of the script's own
# logic depends on the backbone (the GPU run trains DenseNet161, its default).
TINY = ["--device", "cpu", "--size", "32", "--batch", "8", "--steps", "2", "--warmup", "1",
        "--backbone", "resnet18", "--student", "resnet18", "--images", "64",
        "--cap-scale", "3", "--budget", "500"]  # time caps for a GPU's work, not a shared 2-core machine's


def table_values(section: str) -> dict[str, str]:
    """The figures table of a written section: label -> value cell."""
    values = {}
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| ") and len(cells) == 4:
            values[cells[0]] = cells[1]
    return values


def test_every_section_writes_its_figure_and_the_rest_of_the_file_is_kept(ray_session, tmp_path):
    title = f"## GPU throughput (bench/gpu.py): {gpu.card_name(torch.device('cpu'))}\n"
    before = "# Benchmark results\n\n## prepare\n\nkept as it was\n\n"
    after = "## a later section\n\nalso kept\n"
    results = tmp_path / "RESULTS.md"
    results.write_text(f"{before}{title}\nan older run's figures\n\n{after}")

    assert gpu.main([*TINY, "--results", str(results)]) == 0  # 0: no figure missing

    text = results.read_text()
    assert text.startswith(before) and text.endswith(after)
    assert text.count(title) == 1 and "an older run's figures" not in text
    values = table_values(text.split(title)[1].split("\n## ")[0])
    for figure in gpu.FIGURES.values():
        value = float(values[figure.label])
        assert value >= 0 if figure.unit == "share" else value > 0, figure.label
