"""How good a model is: NLB bits per spike (``nlb``), spike-set F1 (``spike_sets``), PSTH
correlation (``psth``), behaviour R^2 and r (``behavior``), rates from a generative model
(``rates``) and baselines (``baselines``). docs/evaluation.md defines each."""
