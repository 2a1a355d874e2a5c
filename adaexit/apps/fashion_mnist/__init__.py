"""The main job: train, calibrate and measure adaptive models on Fashion-MNIST (``python -m adaexit demo``).

* :mod:`.models`: the model zoo (an MLP, a small CNN, a wide early-exit CNN);
* :mod:`.demo`: the job itself.
"""
