"""plot-compare: does PLOT help on my data? A grid of variants and seeds trained on the same data
order and steps, every final model and the starting model evaluated on the same held-out pairs,
and the differences with their uncertainty. ``grid`` (what runs), ``runner`` (running it),
``model_eval`` (what is measured), ``stats`` and ``report`` (what it shows)."""
