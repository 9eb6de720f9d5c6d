"""Render docs/configs.md from the dataclasses, so the page cannot drift from the code.

python -m farflung.config.docs > docs/configs.md
"""

from __future__ import annotations

import dataclasses

from farflung.config.load import _toml_value, field_docs
from farflung.config.schema import SECTIONS

INTRO = """# Configuration

A run is described by one TOML file with the sections below. Every key is optional
(defaults shown); unknown sections or keys are errors that name the key and list the
allowed ones. Any value can be overridden on the command line with
`--set section.key=value` (TOML syntax for the value; a bare word is a string; a list
can be given as `a,b`). The validated, resolved config is written to `RUN/config.toml`
and into every checkpoint.

Shipped configs: `configs/demo.toml` (1.3M-parameter GPT, the demo) and
`configs/small.toml` (10.0M parameters, used by the benchmarks).

Validation lives in one place, `farflung/config/load.py`: types, ranges (`BOUNDS`),
choices (`CHOICES`, plus names that live in higher layers such as
`parallel.algorithm` and `parallel.codec`), and cross-field rules (`model.n_head`
divides `model.d_model`, `optim.min_lr <= optim.lr`, `train.batch_size` divisible by
workers x micro-batch). A bad config exits with code 2 and one line, e.g.:

```
$ farflung train configs/demo.toml --set train.batch_size=7 --workers 2
farflung: config error: train.batch_size = 7 must be divisible by the 2 data-parallel workers; \
allowed: a multiple of 2
```

This page is generated: `python -m farflung.config.docs > docs/configs.md`.
"""


def render_markdown() -> str:
    lines = [INTRO]
    for name, cls in SECTIONS.items():
        docs = field_docs(cls)
        lines += [
            f"## [{name}]",
            "",
            (cls.__doc__ or "").strip(),
            "",
            "| key | default | meaning |",
            "|---|---|---|",
        ]
        defaults = cls()
        for f in dataclasses.fields(cls):
            value = _toml_value(getattr(defaults, f.name))
            lines.append(f"| `{f.name}` | `{value}` | {docs[f.name]} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(render_markdown(), end="")
