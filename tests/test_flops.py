"""The analytic epoch FLOP count (tfrec.training.flops) against hand counts."""

import numpy as np
import pytest

from tfrec.config import ModelConfig
from tfrec.training.flops import epoch_flops


def test_sasrec_positions_hand_count():
    # One user [2, 3, 4]: inputs (2, 3), targets (3, 4); d=2, ffn=4, one block, 4 ids (2 scorable).
    config = ModelConfig(backbone="sasrec", embedding_dim=2, ffn_dim=4, num_layers=1, max_length=5)
    flops = epoch_flops(config, [np.array([2, 3, 4])], vocab_size=4)
    softmax = 2 * (2 * 2 * 2)  # 2 targets x 2 multiply-adds x d x scorable items
    attended = 1.5  # causal: the first input sees 1, the second 2
    per_token = 4 * 2 * 2 * 2 + 2 * 2 * attended * 2 + 2 * 2 * 2 * 4
    assert flops["softmax"] == pytest.approx(3 * softmax)
    assert flops["backbone"] == pytest.approx(3 * 2 * per_token)
    assert flops["total"] == pytest.approx(flops["softmax"] + flops["backbone"])


def test_prefix_scheme_same_softmax_more_backbone():
    sequences = [np.arange(2, 2 + n) for n in (3, 8, 20)]
    config = ModelConfig(backbone="sasrec", max_length=10)
    positions = epoch_flops(config, sequences, vocab_size=50, scheme="positions")
    prefixes = epoch_flops(config, sequences, vocab_size=50, scheme="prefixes")
    assert prefixes["softmax"] == pytest.approx(positions["softmax"])  # the same targets
    assert prefixes["backbone"] > 2 * positions["backbone"]  # each prefix is its own pass


def test_gru_and_bert4rec_counts():
    seq = [np.array([2, 3, 4, 5])]
    gru = epoch_flops(ModelConfig(backbone="gru4rec", embedding_dim=2, gru_hidden_dim=3, num_layers=1), seq, vocab_size=4)
    assert gru["backbone"] == pytest.approx(3 * 3 * (3 * 2 * (2 + 3) * 3 + 2 * 3 * 2))  # 3 inputs
    bert = epoch_flops(ModelConfig(backbone="bert4rec", embedding_dim=2, mask_prob=0.5), seq, vocab_size=4)
    assert bert["softmax"] == pytest.approx(3 * 0.5 * 4 * 2 * 2 * 2)  # half of the 4 items are targets
