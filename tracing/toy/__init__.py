"""The embedded toy model: a miniature FLUX.1 trained on the synthetic shapes world.

Submodules: ``build`` (components), ``train`` (rectified-flow training), ``judge`` (attribute
classifier), ``evaluate`` (sample accuracy and massive-activation summary), ``export``
(shipped folder) and ``cli`` (``massact toy ...``). Import them explicitly; this package
imports nothing heavy on its own.
"""
