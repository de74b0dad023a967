"""Before a launch: what each rank will need (``memory_plan``), from the model's config.json
(``model_shape``) and the data's lengths, and the settings that make a run fit (``fixes``)."""
