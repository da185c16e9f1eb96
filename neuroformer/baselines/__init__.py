"""Reference predictors a model is measured against: the simulator oracle (the ceiling) and a coupled GLM."""
