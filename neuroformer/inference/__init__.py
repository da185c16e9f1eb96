"""Using trained models: spike generation (``generate``), connectivity from attention
(``connectivity``) and loading checkpoints or registered models (``loading``)."""
