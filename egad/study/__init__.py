"""The ablation study: objective presets x training seeds on one fixed teacher, one protocol, one results page.

`grid` names the cells and runs them (in parallel processes where cores allow); `stats` holds the paired tests;
`results` aggregates the run files into docs/results.md and its plot; `driver` is the `egad study` command.
"""
