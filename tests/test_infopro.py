"""infopro: the loss is the paper's formula with the authors' decoder and auxiliary classifier, the weights
follow their schedule over the modules, no error crosses a module, and it learns."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from localcredit.errors import UserError
from localcredit.rules.base import parse_options
from localcredit.rules.infopro import InfoProConfig, auxiliary_classifier, module_weights, reconstruction_target

from .conftest import DEEP_NETWORKS
from .rule_contract import RuleContract
from .test_dgl import assert_module_local


class TestInfoPro(RuleContract):
    rule = "infopro"
    learn_hidden = [256, 256]  # two modules: the first learns InfoPro's two terms, the last through the head
    accuracy_floor = 0.75  # seeds 0-4 x 1, 2 threads: min 0.789, median 0.815 (broken, sign flipped: 0.098)
    # min / median, seeds 0-4 x 1, 2 threads (broken: vgg 0.004, resnet 0.056, user 0.111):
    # vgg 0.815 / 0.825, resnet 0.534 / 0.591, user 0.789 / 0.821
    deep_floors = {"vgg": 0.78, "resnet": 0.47, "user": 0.75}

    @pytest.mark.parametrize("network", ["resnet"])  # the network InfoPro is for; vgg and user: their floors above
    def test_learns_fashion_mnist_on_deep_networks(self, fashion_deep, network):
        super().test_learns_fashion_mnist_on_deep_networks(fashion_deep, network)

    def class_rows(self, rule):
        return [*super().class_rows(rule), *(p for aux in rule.classifiers.values() for p in aux[-1].parameters())]

    def test_module_loss_is_the_papers_formula(self, fashion_small):
        rule = self.make(fashion_small, options=["lambda1=2", "lambda2=0.25"], hidden=[], **DEEP_NETWORKS["resnet"])
        x, y = self.batch(fashion_small, n=16)
        rule.block_step_loss(0, x, y)  # block 0 takes the image it reconstructs
        h = rule.net.blocks[0](x)  # 8 channels, 28 x 28
        decoder, classifier = rule.decoders["0"].net, rule.classifiers["0"]
        image = torch.stack([(s - s.min()) / (s.max() - s.min()) for s in x])  # one channel: the sample's min-max
        reconstruction = torch.sigmoid(decoder(h))  # the map is the image's size: no resize
        want = 2 * nn.BCELoss()(reconstruction, image) + 0.25 * F.cross_entropy(classifier(h), y)
        torch.testing.assert_close(rule.block_loss(0, h, y), want)

    def test_decoder_resizes_and_classifier_is_1c2f(self, fashion_small):
        rule = self.make(fashion_small, hidden=[], **DEEP_NETWORKS["resnet"])  # outputs 8x28x28, 8x28x28, 16x14x14, 32x7x7
        assert sorted(rule.decoders) == sorted(rule.classifiers) == ["0", "1", "2"], "the last learns through the head"
        kinds = [type(m).__name__ for m in rule.decoders["2"].net]
        assert kinds == ["Conv2d", "BatchNorm2d", "ReLU", "Conv2d"] and rule.decoders["2"].net[0].out_channels == 12
        h = torch.randn(3, 16, 14, 14)
        assert rule.decoders["2"](h).shape == (3, 1, 28, 28)  # bilinearly resized to the image first
        big = rule.classifiers["0"]
        assert [type(m).__name__ for m in big] == ["Conv2d", "BatchNorm2d", "ReLU", "AdaptiveAvgPool2d", "Flatten",
                                                   "Linear", "ReLU", "Linear"]
        assert (big[0].out_channels, big[0].stride) == (16, (2, 2)) and big[5].out_features == 128
        small = auxiliary_classifier((32, 7, 7), 10, 128)  # on the last stage's 7x7 map: same channels, stride 1
        assert (small[0].out_channels, small[0].stride, small[-1].out_features) == (32, (1, 1), 10)

    def test_weights_follow_the_papers_schedule(self):
        # ResNet-110, K = 4 (comand.sh): ixx 1 -> 0, ixy 0 -> 1 over the first three modules; the last learns
        # through the head (no loss of its own)
        config = InfoProConfig(lambda1=1, lambda2=0, lambda1_end=0, lambda2_end=1)
        assert [module_weights(m, 4, config) for m in range(4)] == [(1, 0), (0.5, 0.5), (0, 1), (0, 0)]
        assert [module_weights(m, 2, InfoProConfig()) for m in range(2)] == [(5, 0.5), (0, 0)]  # K = 2: its defaults

    def test_the_last_module_learns_with_the_head(self, fashion_small):
        rule = self.make(fashion_small, hidden=[32, 32, 32])
        assert [list(g) for g in rule.layer_groups()] == [[0], [1], [2, 3]]
        losses = dict(rule.local_losses(*self.batch(fashion_small, n=16)))
        assert sorted(losses) == [0, 1, 3]
        head_loss = losses[3]  # the head's cross-entropy trains the last module too, and nothing below it
        assert all(g.abs().sum() > 0 for g in torch.autograd.grad(head_loss, list(rule.net.blocks[2].parameters()),
                                                                   retain_graph=True))
        assert all(g is None for g in torch.autograd.grad(head_loss, list(rule.net.blocks[1].parameters()),
                                                          allow_unused=True))

    def test_reconstruction_target_is_the_image_in_0_1(self):
        image = torch.rand(4, 3, 5, 5)
        image[:, :, 0, 0], image[:, :, 0, 1] = 0, 1  # pixels that span the range, as MNIST's do
        standardised = (image - image.mean((0, 2, 3), keepdim=True)) / image.std((0, 2, 3), keepdim=True)
        torch.testing.assert_close(reconstruction_target(standardised, "bce"), image)
        assert torch.equal(reconstruction_target(standardised, "mse"), standardised)

    @pytest.mark.parametrize("options", [["reconstruction=mse"], ["lambda2=0"]])
    def test_no_error_crosses_a_module(self, fashion_small, options):
        rule = self.make(fashion_small, options=options, **DEEP_NETWORKS["vgg"])
        assert_module_local(rule, *self.batch(fashion_small, n=32))

    def test_reconstruction_needs_the_first_blocks_input(self, fashion_small):
        rule = self.make(fashion_small, hidden=[32, 32, 32])  # blocks 0 and 1 reconstruct
        x, y = self.batch(fashion_small, n=8)
        with pytest.raises(RuntimeError, match="block 0"):
            rule.block_step_loss(1, rule.net.blocks[0](x).detach(), y)
        assert not rule.local, "a block pipeline's later stages do not receive the image"

    @pytest.mark.parametrize("bad", ["lambda1=-1", "lambda1=0 lambda2=0", "decoder_width=0", "reconstruction=l1"])
    def test_bad_options_are_user_errors(self, bad):
        with pytest.raises(UserError):
            parse_options(InfoProConfig, bad.split())
