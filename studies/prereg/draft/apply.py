"""Draft, to be deleted once applied: puts the hand-written sections into docs/results.md and the README's study
section after finish.sh. Run from the repository root: python3 studies/prereg/draft/apply.py KEY=FILE ... where each
KEY is a placeholder left in the drafts (CONTROLS, CONTROLS_README, STUDY_HOURS) and FILE
holds its text."""

import re
import sys
from pathlib import Path

HERE = Path(__file__).parent
subs = dict(a.split("=", 1) for a in sys.argv[1:])  # KEY=file-with-text


def fill(text):
    for k, f in sorted(subs.items(), key=lambda kv: -len(kv[0])):  # CONTROLS_README before CONTROLS
        text = text.replace(k, Path(f).read_text().rstrip("\n"))
    assert not re.search(r"\b(CONTROLS|CONTROLS_README|STUDY_HOURS)\b", text), "placeholder left"
    return text


readme = Path("README.md").read_text()
a = readme.index("## Does EGAD beat the baselines? The study")
b = readme.index("## Evaluate and report")
readme = readme[:a] + fill((HERE / "readme-study.md").read_text()) + "\n\n" + readme[b:]
old = "the study below\nmeasures them with three seeds on all of test500."
assert old in readme
readme = readme.replace(old, "the pre-registered\nstudy below measures them with seven seeds on all 500 test examples.")
old = "docs/results.md        the study on the real teacher (SmolLM2-135M-Instruct): EGAD vs the baselines, 3 seeds\n"
assert old in readme
readme = readme.replace(
    old,
    "docs/results.md        the pre-registered study on the real teacher (SmolLM2-135M-Instruct): 5 cells x 7 seeds\n"
    "docs/results-30step.md  the earlier, exploratory real-teacher study (30 steps, 3 seeds)\n",
)
Path("README.md").write_text(readme)
page = Path("docs/results.md").read_text()
for head, f in (
    ("## What the numbers show", HERE / "show.md"),
    ("## Deviations from the pre-registration", HERE / "dev.md"),
):
    stub = head + "\n\n_Not written yet._"
    assert stub in page, head
    page = page.replace(stub, fill(Path(f).read_text()).rstrip("\n"))
Path("docs/results.md").write_text(page)
old30 = "# Results: EGAD vs baselines on Dolly\n"
p30 = Path("docs/results-30step.md")
t30 = p30.read_text()
if old30 in t30 and "_The earlier" not in t30:
    p30.write_text(
        t30.replace(
            old30,
            old30 + "\n_The earlier, exploratory study on the real teacher (2026-12-02): 3 seeds, 30 steps. The "
            "pre-registered study that settles its question is [results.md](results.md); this page is kept as it was "
            "generated, with the commands of that time._\n",
            1,
        )
    )
cfg = Path("configs/study/smollm2.yaml")
cfg.write_text(
    cfg.read_text().replace("--results docs/results.md --beside", "--results docs/results-30step.md --beside")
)
print("applied")
