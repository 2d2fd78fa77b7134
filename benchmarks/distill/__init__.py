"""Data and probes for distilling the embedded 270M's drafter (docs/distill.md, docs/research-notes.md)."""
