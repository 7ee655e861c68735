"""Monitoring: what the live model sees and how well it does, and when to retrain.

``records`` (observations of batch runs and captured traffic, capture slices, feedback labels),
``drift`` (a batch against the training baseline), ``checks`` (checking one source), ``feedback``
(reading and checking label drops), ``live`` (the live metric), ``decisions`` (history, triggers,
cool-down, the retraining decision) and ``labelled`` (labelled rows for the retraining run).
"""
