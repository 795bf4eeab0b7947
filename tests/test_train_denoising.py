"""Contrastive denoising queries: the noise they carry, the mask that keeps them from leaking into the matching
queries, and their loss driving training."""

import torch

from gdino.train.data import ShapesDataset, collate
from gdino.train.denoising import build_denoising, jitter_boxes
from gdino.train.loop import LoopConfig, OptimConfig, Trainer
from gdino.train.losses import SetCriterion
from gdino.train.matcher import HungarianMatcher
from gdino.train.targets import positive_maps
from training import FixedBatch, small_model


def _corner_shift_in_half_sizes(noised, truth):
    """Largest corner move of each box, in units of the box's half width / half height."""
    def corners(b):
        return torch.cat([b[:, :2] - b[:, 2:] / 2, b[:, :2] + b[:, 2:] / 2], -1)

    half = truth[:, 2:].repeat(1, 2) / 2
    return ((corners(noised) - corners(truth)).abs() / half).amax(-1)


def test_positive_noise_stays_inside_and_negative_noise_outside_the_box_scale():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(1)
    truth = torch.tensor([[0.5, 0.5, 0.2, 0.3]]).repeat(400, 1)  # far from the borders: no clamping
    negative = torch.arange(400) >= 200
    noised = jitter_boxes(truth, negative, box_noise=0.5, generator=generator)
    shift = _corner_shift_in_half_sizes(noised, truth)
    assert shift[:200].max() < 0.5 + 1e-5
    assert shift[200:].max() < 1.0 + 1e-5
    # every negative has at least one corner moved by >= 0.5 half-sizes (all four are, by construction)
    assert shift[200:].min() >= 0.5 - 1e-5
    # the positives are not just copies of the truth
    assert shift[:200].mean() > 0.2


def test_groups_slots_and_mask():
    boxes = [torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.1, 0.3]]), torch.tensor([[0.5, 0.5, 0.4, 0.4]])]
    maps = [torch.tensor([[0, 1, 1, 0, 0, 0], [0, 0, 0, 0, 1, 0.]]), torch.tensor([[0, 0, 1, 0, 0, 0.]])]
    features = torch.randn(2, 6, 8)
    dn = build_denoising(boxes, maps, features, total_queries=12, label_noise=0.0)
    assert dn.groups == 3 and dn.max_objects == 2 and dn.num_queries == 12
    # slot layout: per group [pos obj0, pos obj1, neg obj0, neg obj1]
    assert dn.positive.tolist() == [True, True, False, False] * 3
    assert dn.object_index.tolist() == [0, 1, 0, 1] * 3
    assert dn.valid[0].all() and dn.valid[1].tolist() == [True, False, True, False] * 3
    # content = mean feature of the object's phrase tokens (no label noise asked)
    assert torch.allclose(dn.content[0, 0], features[0, 1:3].mean(0))
    assert torch.allclose(dn.content[0, 3], features[0, 4])
    assert torch.allclose(dn.content[1, 2], features[1, 2])
    mask = dn.attention_mask(5)
    assert mask.shape == (17, 17)
    assert not mask[12:, :12].any() and mask[12:, 12:].all()  # matching queries see only each other
    assert mask[:4, :4].all() and not mask[:4, 4:12].any() and mask[:4, 12:].all()
    assert build_denoising([torch.zeros(0, 4)], [torch.zeros(0, 6)], features[:1]) is None


def _batch():
    source = ShapesDataset(seed=5, image_size=64, referring=0.0, clutter=0.0, max_objects=3)
    return collate([source[0], source[1]])


def test_denoising_queries_do_not_change_the_matching_queries():
    """With dropout off, the matching queries' outputs are the same with or without the denoising queries in
    the decoder; without the attention mask they would differ (the test can fail)."""
    model = small_model()
    model.eval()  # dropout off; the forward still takes the denoising queries
    with torch.no_grad():  # a trained-like box head (its last layer starts at zero): boxes depend on the queries
        for head in model.bbox_embed:
            head.layers[-1].weight.normal_(0, 0.05)
    batch = _batch()
    with torch.no_grad():
        text = model.encode_text(list(batch.captions))
        maps = positive_maps(batch.targets, text.offsets, text.num_tokens)
        boxes = [t.boxes_cxcywh for t in batch.targets]
        dn = build_denoising(boxes, maps, text.features, total_queries=10, generator=torch.Generator().manual_seed(0))
        plain = model(batch.images, text)
        with_dn = model(batch.images, text, denoising=dn)
        assert len(with_dn.denoising) == model.config.decoder_layers
        assert with_dn.denoising[-1]["boxes"].shape == (2, dn.num_queries, 4)
        assert with_dn.logits.shape == plain.logits.shape
        torch.testing.assert_close(with_dn.logits, plain.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(with_dn.boxes, plain.boxes, atol=1e-6, rtol=0)
        # Leaky mask: let the matching queries see the denoising ones -> outputs change.
        original = dn.attention_mask
        dn.attention_mask = lambda q: torch.ones(dn.num_queries + q, dn.num_queries + q, dtype=torch.bool)
        leaky = model(batch.images, text, denoising=dn)
        dn.attention_mask = original
        finite = torch.isfinite(plain.logits)
        assert (leaky.logits[finite] - plain.logits[finite]).abs().max() > 1e-3
        assert (leaky.boxes - plain.boxes).abs().max() > 1e-4


def test_training_with_denoising_separates_positive_and_negative_queries(tmp_path):
    """On fixed scenes, training with denoising makes the positive queries (near an object) answer with their
    object's tokens and the negative ones (jittered off it) answer with nothing: the contrast CDN is for. Before
    training the two are alike. The dn terms are logged for the final and the auxiliary decoder layers."""
    source = ShapesDataset(seed=5, image_size=64, referring=0.0, clutter=0.0, max_objects=2)
    samples = [source[0], source[1]]
    criterion = SetCriterion(HungarianMatcher(), denoising={"queries": 8, "box_noise": 0.4, "label_noise": 0.5})
    trainer = Trainer(small_model(), criterion, FixedBatch(samples),
                      OptimConfig(steps=200, batch_size=2, lr=3e-3, lr_backbone=3e-3, lr_text=0.0, warmup=5,
                                  clip=1.0, final_lr_fraction=0.2, threads=2),
                      LoopConfig(out_dir=str(tmp_path / "run"), log_every=10, checkpoint_every=0),
                      progress=False)

    def contrast():
        model = trainer.model
        model.eval()
        batch = collate(samples)
        with torch.no_grad():
            text = model.encode_text(list(batch.captions))
            maps = positive_maps(batch.targets, text.offsets, text.num_tokens)
            boxes = [t.boxes_cxcywh for t in batch.targets]
            pos, neg = [], []
            for seed in range(4):
                dn = build_denoising(boxes, maps, text.features, total_queries=8, box_noise=0.4, label_noise=0.0,
                                     generator=torch.Generator().manual_seed(seed))
                probs = model(batch.images, text, denoising=dn).denoising[-1]["logits"].sigmoid()
                for b in range(2):
                    for slot in torch.nonzero(dn.valid[b]).flatten():
                        own = maps[b][dn.object_index[slot]] > 0
                        score = probs[b, slot][own].mean()
                        (pos if dn.positive[slot] else neg).append(score)
        return torch.stack(pos).mean().item(), torch.stack(neg).mean().item()

    before_pos, before_neg = contrast()
    history = trainer.run()
    after_pos, after_neg = contrast()
    figures = (before_pos, before_neg, after_pos, after_neg)
    assert abs(before_pos - before_neg) < 0.1, figures
    # The property, in relative terms: the positives now answer clearly more than the negatives, and the gap
    # opened by training. Absolute levels depend on the CPU's float rounding along 200 steps: measured after
    # training 0.35 / 0.05 on an AMD EPYC and 0.72 / 0.33 on an Intel Xeon (the old absolute bound, negative
    # < 0.15, failed there); untrained or a broken denoising loss gives a gap near 0.
    assert after_pos - after_neg > 0.2 and after_pos > 1.8 * after_neg, figures
    assert (after_pos - after_neg) - abs(before_pos - before_neg) > 0.2, figures
    records = [h["dn_class"] for h in history if "dn_class" in h]
    # Mean of the last two logs against the first: one noisy log cannot decide.
    assert sum(records[-2:]) / 2 < records[0] / 4, records
    trainer.model.train()
    from gdino.train.loop import loss_on_batch

    losses = loss_on_batch(trainer.model, criterion, collate(samples), "cpu")
    assert {"dn_class", "dn_bbox", "dn_giou", "dn_aux0_bbox"} <= set(losses)


def test_denoising_is_a_config_option(tmp_path):
    from gdino.train.cli import read_config
    from gdino.train.losses import build_criterion

    assert build_criterion({}).denoising is None
    criterion = build_criterion({"denoising": True, "dn_queries": 50, "dn_label_noise": 0.2})
    assert criterion.denoising == {"queries": 50, "box_noise": 0.4, "label_noise": 0.2}
    path = tmp_path / "train.toml"
    path.write_text('[model]\npreset = "tiny"\n[data]\nkind = "shapes"\n[loss]\ndenoising = true\ndn_box_noise = 0.3\n')
    assert read_config(path)["loss"]["dn_box_noise"] == 0.3
    path.write_text('[model]\npreset = "tiny"\n[data]\nkind = "shapes"\n[loss]\ndn_box_nosie = 0.3\n')
    try:
        read_config(path)
    except ValueError as exc:
        assert "dn_box_nosie" in str(exc)
    else:
        raise AssertionError("a misspelt loss key was accepted")
