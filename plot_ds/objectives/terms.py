"""The vanilla objective terms, each declared once: its name, the loss module that computes it and
the ``objective`` config fields it takes, what its formula reads (a reference model, the whole
global batch), its formula and paper. The config's choices (``ObjectiveConfig``), the table in
docs/method.md (``terms_table``, checked by a test) and the builders (``objective.build_term``)
all read ``TERMS``. No torch here: the config is validated against it before anything heavy loads."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TermSpec:
    name: str
    loss: str  # its class in objective.py
    parameters: tuple[str, ...] = ()  # ObjectiveConfig fields, its constructor's arguments in order
    options: tuple[tuple[str, object], ...] = ()  # fixed keyword arguments
    reference: bool = False  # reads the reference model's log-probs
    global_batch: bool = False  # reads the whole global batch (a sort over it)
    formula: str = ""  # the loss per pair, for docs/method.md
    paper: str = "-"


TERMS = {
    spec.name: spec
    for spec in (
        TermSpec("sft", "SFTLoss", formula="`-pi(y+)`, divided by the chosen tokens of the batch (a token mean)"),
        TermSpec(
            "dpo",
            "DPOLoss",
            ("beta", "label_smoothing"),
            reference=True,
            formula="`-(1 - ls) log sigma(beta m) - ls log sigma(-beta m)`, `m = (pi(y+) - ref(y+)) - (pi(y-) - "
            "ref(y-))`",
            paper="Rafailov et al. 2023; `ls`: conservative DPO",
        ),
        TermSpec(
            "ipo",
            "IPOLoss",
            ("beta",),
            reference=True,
            formula="`(m' - 1 / (2 beta))^2`, `m'` as `m` on length-averaged log-probs",
            paper="Azar et al. 2024",
        ),
        TermSpec(
            "simpo",
            "SimPOLoss",
            ("beta", "simpo_gamma"),
            formula="`-log sigma(beta (r+ - r-) - simpo_gamma)`",
            paper="Meng et al. 2024",
        ),
        TermSpec(
            "pro",
            "PROLoss",
            ("pro_temperature", "pro_sft_weight"),
            formula="`-log sigma((r+ - r-) / pro_temperature) - pro_sft_weight * pi(y+)`",
            paper="Song et al., AAAI 2024",
        ),
        TermSpec(
            "aot",
            "AOTLoss",
            ("beta", "label_smoothing"),
            (("paired", True),),
            reference=True,
            global_batch=True,
            formula="`-(1 - ls) log sigma(beta d_k) - ls log sigma(-beta d_k)`, `d_k` = k-th smallest `pi(y+) - "
            "pi(y-)` of the batch minus k-th smallest `ref(y+) - ref(y-)`",
            paper="Melnyk et al., NeurIPS 2024",
        ),
        TermSpec(
            "aot_unpaired",
            "AOTLoss",
            ("beta", "label_smoothing"),
            (("paired", False),),
            reference=True,
            global_batch=True,
            formula="as `aot`, `d_k` = k-th smallest `pi(y+) - ref(y+)` minus k-th smallest `pi(y-) - ref(y-)`",
            paper="same",
        ),
    )
}


def terms_table() -> str:
    """docs/method.md's table of the terms."""
    rows = ["| term | loss per pair (mean over the global batch) | reference | paper |", "| --- | --- | --- | --- |"]
    rows += [f"| `{s.name}` | {s.formula} | {'yes' if s.reference else 'no'} | {s.paper} |" for s in TERMS.values()]
    return "\n".join(rows)
