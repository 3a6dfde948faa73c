"""The published test errors the benchmark sets our numbers beside, with where each comes from.

Data only. Every number is copied from /work/shared/METHODS.md ("Reference numbers from the field's
anchors"), which copied it from the source named in ``source``; a case without a reachable number
has none here, and the report shows '-'. ``bp_free`` says whether the *published* training kept
the error from crossing blocks end to end (None: the source does not say).
"""

from __future__ import annotations

from dataclasses import dataclass

LOCAL_LOSS = "Nøkland & Eidnes 2019, README of anokland/local-loss"
BIOTORCH = "BioTorch Benchmarks.md (LeNet)"
LFNN_LOGS = "LFNN authors' released logs (arXiv 2310.07885)"

#: Said next to every LFNN number: the authors' other released code is not BP-free (METHODS.md).
LFNN_NOTE = ("the LFNN authors' released CIFAR-10 code (TensorFlow) applies every loss's gradient through the "
             "whole backbone, and their ImageNet 'BP-free' ResNets call backward on a sum of losses with no "
             "detach between stages: those numbers (CIFAR-10 20.95 % error; ResNet-101 78.87 % top-1) are not "
             "BP-free. The MNIST log does not say which variant it ran. Our lfnn-l detaches every block's input")


@dataclass(frozen=True)
class Published:
    """One published test error (%), its source, and whether that training was free of end-to-end BP."""

    error: float
    source: str
    bp_free: bool | None
    note: str = ""

    @property
    def bp_free_text(self) -> str:
        return {True: "yes", False: "no (end-to-end BP)", None: "not stated"}[self.bp_free]


def _local_loss(network: str, mnist: tuple[float, ...], fashion: tuple[float, ...]) -> dict:
    """local-loss's columns BP / pred / sim / predsim for one network on MNIST and Fashion-MNIST."""
    table = {}
    for data, errors in (("mnist", mnist), ("fashion-mnist", fashion)):
        for row, error in zip(("bp", "pred", "sim", "predsim"), errors):
            table[row, data] = Published(error, f"{LOCAL_LOSS}, {network}", bp_free=row != "bp")
    return table


#: local-loss (METHODS.md): MNIST with 2-pixel jitter; Fashion-MNIST with jitter and flip.
LOCAL_LOSS_MLP = _local_loss("mlp 3x1024", mnist=(0.75, 0.68, 0.80, 0.62), fashion=(8.37, 8.60, 9.70, 8.54))
LOCAL_LOSS_VGG8B = _local_loss("vgg8b", mnist=(0.26, 0.40, 0.65, 0.31), fashion=(4.53, 5.66, 5.12, 4.65))

#: BioTorch's LeNet benchmark (METHODS.md): the model with the best validation accuracy, evaluated on
#: that same 10k validation set.
BIOTORCH_LENET = {
    (row, data): Published(error, BIOTORCH, bp_free=row != "bp",
                           note="BioTorch reports its best-validation model, evaluated on that same validation set")
    for data, errors in (("mnist", (0.91, 1.7, 1.61)), ("fashion-mnist", (9.2, 13.06, 12.81)))
    for row, error in zip(("bp", "fa", "dfa"), errors)
}

#: The LFNN MNIST MLP (784-256-128, 32 workers, delta 0.7, Adam 5e-4, batch 128, 50 epochs).
LFNN_MNIST = {("lfnn-l", "mnist"): Published(1.20, f"{LFNN_LOGS}, MLP 784-256-128, 50 epochs", bp_free=None,
                                             note=LFNN_NOTE)}
