"""localcredit: train deep networks without end-to-end backpropagation, and compare the rules honestly.

The Python API (docs/python.md)::

    import localcredit as lc
    net = lc.blocknet(my_sequential, input_shape=(1, 28, 28), num_classes=10)
    net = lc.blocknet(my_resnet, input_shape=(3, 32, 32), num_classes=10, cut_at=["layer1", "layer2"])  # any traceable model
    rule = lc.make_rule("local-learned", net, lr=1e-3, loss="ce")
    stats = rule.step(x, y)          # one training step: its figures ("loss" among them), 0-dim tensors or floats
    predictions = rule.predict(x)
"""

__version__ = "0.1.0"

from .errors import UserError
from .experiment import RunSpec, fit
from .nets.architectures import NetSpec, register_architecture
from .nets.blocknet import BlockNet, blocknet
from .nets.layers import register_layer
from .rules import Rule, make_rule
from .rules import available as available_rules
from .rules import register as register_rule

__all__ = ["BlockNet", "NetSpec", "Rule", "RunSpec", "UserError", "available_rules", "blocknet", "fit", "make_rule",
           "register_architecture", "register_layer", "register_rule"]
