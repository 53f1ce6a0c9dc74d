"""Experiments built on train and eval: comparisons and sweeps (``compare``), their reports
(``report``), and catastrophic-forgetting measurement (``forgetting``).

Import the module you need (``from peftlab.experiment.forgetting import forgetting_report``);
this package imports nothing itself, so using one experiment does not load the others.
"""
