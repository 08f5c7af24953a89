"""The model pieces of blip3o.py on tiny configs: shapes, where gradients go, masks, checkpoint round trips."""
import dataclasses
import json

import pytest
import numpy as np
import torch

import blip3o
import data
import pipeline


@pytest.fixture(scope="module")
def parts():
    """A tiny toy model: tokenizer, frozen CLIP, a VLM and both generator heads."""
    torch.manual_seed(0)
    tok = blip3o.build_toy_tokenizer(data.VOCAB)
    cfg = blip3o.get_config("toy")
    cfg.clip = dataclasses.replace(cfg.clip, vocab_size=len(tok), width=32, heads=1, layers=1, text_width=32,
                                   text_heads=1, text_layers=1, embed_dim=32)
    cfg.lm = dataclasses.replace(cfg.lm, vocab_size=len(tok), hidden_size=32, num_layers=2, num_heads=2,
                                 num_kv_heads=1, intermediate_size=64)
    cfg.dit = dataclasses.replace(cfg.dit, in_channels=32, hidden_size=32, num_layers=2, num_heads=2,
                                  num_kv_heads=2, ffn_dim=64, cond_dim=32)
    clip = blip3o.ImageEncoder(cfg.clip).eval().requires_grad_(False)
    vlm = blip3o.VisionLanguageModel(blip3o.build_backbone(cfg.lm), cfg.clip.width,
                                     tok.convert_tokens_to_ids(blip3o.IMAGE), cfg.lm.image_merge)
    images = torch.rand(3, 3, 32, 32)
    return tok, cfg, clip, vlm, images


def test_toy_clip_gives_64_tokens_and_their_embedding(parts):
    tok, cfg, clip, _, images = parts
    tokens = clip.tokens(images)
    assert tokens.shape == (3, 64, cfg.clip.width)
    # the embedding of the 64 tokens alone is the image embedding (what the contrastive loss reuses)
    # Two code paths over the same ops (tokens then pooling, or open_clip's encode_image): default fp32 tol.
    torch.testing.assert_close(clip.embed_tokens(tokens), clip.encode_image(images))


def test_dense_objective_trains_the_tokens_and_ignores_background_boxes(parts):
    tok, cfg, _, _, _ = parts
    clip = blip3o.ImageEncoder(cfg.clip)  # trainable copy; the toy config has the dense head
    assert clip.dense_head is not None
    images, scenes = data.make_image_set(4, split="train", seed=3)
    colour, shape, box = (torch.from_numpy(np.stack(x)) for x in zip(*[data.token_labels(s) for s in scenes]))
    tokens = clip.tokens(images.float() / 255)
    loss = clip.dense_loss(tokens, colour, shape, box)
    loss.backward()
    # The gradient reaches the vision tower, not only the head: the objective shapes the tokens.
    assert clip.model.visual.conv1.weight.grad.abs().sum() > 0
    # Boxes are scored on object tokens only: other numbers on background tokens change nothing.
    background = shape == len(data.SHAPES)
    assert background.any() and (~background).any()
    moved = box.clone()
    moved[background] = 0.5
    with torch.no_grad():
        torch.testing.assert_close(clip.dense_loss(tokens, colour, shape, moved), loss.detach())
        moved[~background] += 0.25  # ... while a wrong box on an object token costs
        assert clip.dense_loss(tokens, colour, shape, moved) > loss.detach()


def test_scene_tokens_each_name_the_whole_scene_and_leave_the_patch_tokens_alone(parts):
    tok, cfg, _, _, _ = parts
    clip = blip3o.ImageEncoder(cfg.clip)  # trainable copy; the toy config has the scene blocks
    images, scenes = data.make_image_set(4, split="train", seed=3)
    colour, shape, box = (torch.from_numpy(np.stack(x)) for x in zip(*[data.scene_labels(s) for s in scenes]))
    scene = clip.target_tokens(images.float() / 255)
    assert scene.shape == (4, 64, cfg.clip.scene_width)
    clip.scene_loss(scene, colour, shape, box).backward()
    # The scene blocks train on their own objective; the patch tokens (what the LM reads) get no gradient.
    assert clip.scene_head.weight.grad.abs().sum() > 0 and clip.scene_pos.grad.abs().sum() > 0
    assert clip.model.visual.conv1.weight.grad is None
    # Every token is scored: a head that reads the right scene from the mean but not from each token costs.
    with torch.no_grad():
        same = scene.mean(1, keepdim=True).expand_as(scene)
        spread = same + torch.randn_like(scene) * 3
        assert clip.scene_loss(spread, colour, shape, box) > clip.scene_loss(same, colour, shape, box)
    c, s, b = clip.read_scene(scene)
    assert c.shape == s.shape == (4, blip3o.SCENE_SLOTS) and b.shape == (4, blip3o.SCENE_SLOTS, 4)


def test_scene_labels_draw_back_to_the_same_image():
    """What the scene tokens are trained to say is enough to draw the image exactly (the 'tokens say' score)."""
    images, scenes = data.make_image_set(60, split="test", seed=5)
    for img, scene in zip(images, scenes):
        colour, shape, box = data.scene_labels(scene)
        assert (shape < len(data.SHAPES)).sum() == len(scene.objects)
        drawn = data.draw_objects(data.objects_from_slots(colour, shape, box))
        assert np.array_equal(drawn, img.permute(1, 2, 0).numpy())


def test_pixel_decoder_reads_objects_and_learns_to_draw_them():
    torch.manual_seed(0)
    cfg = blip3o.DecoderConfig(width=32)
    dec = blip3o.PixelDecoder(cfg, token_dim=32)
    images, scenes = data.make_image_set(8, split="train", seed=1)
    images = images.float() / 255
    colour, shape, box = (torch.from_numpy(np.stack(x)) for x in zip(*[data.scene_labels(s) for s in scenes]))
    tokens = torch.randn(8, 1, 32).expand(8, 64, 32)  # one scene vector per image, on every token
    out = dec(tokens)
    assert out.shape == (8, 3, 32, 32) and out.min() >= 0 and out.max() <= 1
    logits = dec.read(tokens)  # colour, shape, size, corner x, corner y of every object
    assert [tuple(x.shape) for x in logits] == [(8, 4, 11), (8, 4, 4)] + [(8, 4, 8)] * 3  # sizes: 0..28 px
    # Object-centric: each object is read from its own 8 channels only, by the same head as any other.
    other = tokens.clone()
    other[..., 8:16] += 1  # object 1's channels
    changed = dec.read(other)[0]
    assert torch.equal(changed[:, 0], logits[0][:, 0]) and not torch.equal(changed[:, 1], logits[0][:, 1])
    swapped = tokens.unflatten(-1, (4, 8)).flip(-2).flatten(-2)  # the objects' channel blocks reversed
    assert torch.allclose(dec.read(swapped)[0], logits[0].flip(1), atol=1e-6)
    # Every object is drawn where its corner says: moving one changes the picture (once the
    # palette, zero at the start, has colours), and "no object" paints nothing.
    with torch.no_grad():
        dec.palette.weight[:-1].normal_()
    size, corner = torch.full_like(colour, 2), torch.stack([x.argmax(-1) for x in logits[3:]], -1)
    moved = corner.clone()
    moved[:, 0, 0] = (moved[:, 0, 0] + 2) % 8
    assert not torch.allclose(dec.draw(colour, shape, size, moved), dec.draw(colour, shape, size, corner))
    nothing = torch.full_like(colour, blip3o.DENSE_COLOURS - 1)
    assert torch.equal(dec.draw(nothing, shape, size, corner), dec.background.view(1, 3, 1, 1).expand_as(out))
    # Trained on these 8 images, the pixel loss and the read-out's loss fall.
    opt = torch.optim.Adam(dec.parameters(), lr=1e-2)
    first = dec.loss(images, tokens, colour, shape, box)[1]
    for _ in range(150):
        loss, logs = dec.loss(images, tokens, colour, shape, box)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert logs["loss_pixels"] < 0.5 * first["loss_pixels"] and logs["loss_read"] < 0.5 * first["loss_read"]


def test_pixel_decoder_draws_each_shape_at_every_size_and_place():
    """Drawn from the true classes, the sprites learn the world's shapes: after training on true scenes,
    new scenes come out nearly pixel for pixel, objects at the canvas edge included."""
    torch.manual_seed(0)
    dec = blip3o.PixelDecoder(blip3o.DecoderConfig(), token_dim=32)
    def scenes(n, split):
        images, scenes = data.make_image_set(n, split=split, seed=2)
        labels = zip(*[data.scene_labels(s) for s in scenes])
        colour, shape, box = (torch.from_numpy(np.stack(x)) for x in labels)
        size, corner = dec.box_classes(box)
        # The decoder's grid is the world's lattice: sizes and corners are exact, at the edges too.
        assert torch.equal(size * 4, ((box[..., 2] - box[..., 0]) * 32).round().long().clamp(max=28))
        return images.float() / 255 * 2 - 1, (colour, shape, size, corner)
    train, test = scenes(64, "train"), scenes(32, "test")
    opt = torch.optim.Adam(dec.parameters(), lr=1e-2)
    for _ in range(300):
        loss = torch.nn.functional.mse_loss(dec.draw(*train[1]), train[0])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        drawn = dec.draw(*test[1])
    # A pixel is wrong when it is nearer another colour than its own: under 1 % of them (a square drawn
    # for a circle is 3 % of the image).
    wrong = ((drawn - test[0]).abs().amax(1) > 0.25).float().mean()
    assert wrong < 0.01, wrong


def test_understanding_loss_masks_everything_but_the_answers(parts):
    tok, cfg, clip, vlm, images = parts
    turns = [[("what color is the circle ?", "red"), ("how many objects are there ?", "two")],
             [("describe the image .", "a red circle and a blue square")]]
    ids, labels, lens = blip3o.build_conversation_batch(tok, 64, turns)
    kept = [tok.convert_ids_to_tokens(int(i)) for i in labels[0][labels[0] != -100]]
    assert kept == ["red", "<eos>", "two", "<eos>"]
    assert (labels[:, :65] == -100).all()  # <bos> and the 64 image slots
    assert (labels[1, lens[1]:] == -100).all()  # padding
    # The loss only sees labelled positions: its gradient w.r.t. the logits vanishes everywhere else
    # (position i predicts token i + 1).
    logits = torch.randn(*ids.shape, len(tok), requires_grad=True)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(),
                                             ignore_index=-100)
    loss.backward()
    used = logits.grad.abs().sum(-1)[:, :-1] > 0
    assert torch.equal(used, labels[:, 1:] != -100)


def test_patch_merger_joins_each_2x2_block_of_the_grid():
    proj = blip3o.Projector(4, 8, merge=2)
    x = torch.randn(1, 64, 4)  # an 8x8 grid, row-major
    out = proj(x)
    assert out.shape == (1, 16, 8)
    # CLIP token (row 1, col 1) = index 9 belongs to merged token (0, 0); (row 1, col 2) = 10 to (0, 1);
    # (row 2, col 0) = 16 to (1, 0) = merged index 4. Changing one changes exactly its merged token.
    for clip_index, merged_index in ((9, 0), (10, 1), (16, 4), (63, 15)):
        y = x.clone()
        y[0, clip_index] += 1.0
        changed = (proj(y) - out).abs().sum(-1)[0] > 0
        assert changed.nonzero().flatten().tolist() == [merged_index]
    with pytest.raises(ValueError, match="square grid"):
        proj(torch.randn(1, 60, 4))


def test_toy_lm_reads_16_merged_image_tokens(parts):
    tok, cfg, clip, vlm, images = parts
    assert vlm.image_tokens(64) == 16
    ids, _, _ = blip3o.build_qa_batch(tok, vlm.image_tokens(64), ["what color is the circle ?"] * 3)
    assert int((ids == vlm.image_token_id).sum()) == 3 * 16
    _, logits = vlm(ids, clip.tokens(images))
    assert logits.shape[:2] == ids.shape
    with pytest.raises(ValueError, match="placeholders"):  # an image needs its 16 slots, not 64
        vlm(blip3o.build_qa_batch(tok, 64, ["what color is the circle ?"] * 3)[0], clip.tokens(images))


def test_toy_lm_with_multimodal_rope(parts):
    """mrope_section builds the toy LM as a tiny Qwen2.5-VL: its image tokens take 2-D positions, it
    trains like the Qwen2 toy, and the setting survives a checkpoint's config."""
    tok, cfg, clip, _, images = parts
    lm_cfg = dataclasses.replace(cfg.lm, mrope_section=(2, 3, 3))  # head_dim 16: 8 frequency pairs
    vlm = blip3o.VisionLanguageModel(blip3o.build_backbone(lm_cfg), cfg.clip.width,
                                     tok.convert_tokens_to_ids(blip3o.IMAGE), cfg.lm.image_merge)
    assert vlm.mrope
    ids, labels, _ = blip3o.build_qa_batch(tok, vlm.image_tokens(64), ["what color is the circle ?"] * 3,
                                           ["red", "blue", "pink"])
    loss, _ = vlm(ids, clip.tokens(images), labels)
    loss.backward()
    assert vlm.projector.linear_1.weight.grad.abs().sum() > 0
    saved = dataclasses.replace(cfg, lm=lm_cfg)
    assert blip3o.Config.from_dict(json.loads(json.dumps(saved.to_dict()))).lm == lm_cfg


def test_stage1_gradients_reach_projector_and_lm_never_clip(parts):
    tok, cfg, clip, vlm, images = parts
    ids, labels, _ = blip3o.build_qa_batch(tok, vlm.image_tokens(64), ["what color is the circle ?"] * 3,
                                           ["red", "blue", "pink"])
    loss, _ = vlm(ids, clip.tokens(images), labels)
    loss.backward()
    assert all(p.grad is not None for p in vlm.projector.parameters())
    assert sum(p.grad is not None for p in vlm.lm.parameters()) >= len(list(vlm.lm.parameters())) - 1
    assert all(p.grad is None for p in clip.parameters())
    vlm.zero_grad(set_to_none=True)


def test_text_rows_run_without_an_image_and_label_only_the_answers(parts):
    tok, cfg, clip, vlm, images = parts
    turns = [[("Please generate an image based on the following caption: a red circle . what color is the "
               "circle ?", "red")]]
    ids, labels, _ = blip3o.build_conversation_batch(tok, 0, turns)
    assert tok.convert_tokens_to_ids(blip3o.IMAGE) not in ids.tolist()[0]
    kept = [tok.convert_ids_to_tokens(int(i)) for i in labels[0][labels[0] != -100]]
    assert kept == ["red", "<eos>"]
    loss, logits = vlm(ids, None, labels)
    # The loss is the cross-entropy of the two answer tokens alone: recomputed from the logits here.
    targets = labels[0, 1:]
    expected = torch.nn.functional.cross_entropy(logits[0, :-1][targets != -100], targets[targets != -100])
    assert logits.shape[:2] == ids.shape and torch.allclose(loss, expected, atol=1e-6)
    loss.backward()
    assert all(p.grad is None or not p.grad.any() for p in vlm.projector.parameters())  # no image, no projector
    vlm.zero_grad(set_to_none=True)
    img_ids, _, _ = blip3o.build_qa_batch(tok, vlm.image_tokens(64), ["what color is the circle ?"], ["red"])
    with pytest.raises(ValueError, match="placeholders"):
        vlm(img_ids, None)  # image slots but no image tokens: refused, not silently left as <image> embeddings


@pytest.mark.parametrize("loss", ["flow", "mse"])
def test_stage2_gradients_reach_exactly_queries_and_head(parts, loss):
    tok, cfg, clip, vlm, images = parts
    vlm.requires_grad_(False).eval()
    gen = blip3o.Generator(cfg, loss=loss, target_dim=cfg.clip.width)
    if loss == "flow":  # a fresh DiT's final layer is zero, which blocks every gradient upstream of it
        torch.nn.init.normal_(gen.dit.norm_out.linear_2.weight, std=0.02)
    captions = ["a red circle", "two squares", "a blue triangle above a red circle"]
    ids, lens, _ = blip3o.encode_prompts(tok, captions, 24)
    assert gen.condition(vlm.lm, ids, lens).shape == (3, 64, cfg.lm.hidden_size)
    value, _, _ = gen.loss(vlm.lm, ids, lens, clip.tokens(images))
    value.backward()
    assert gen.queries.grad is not None and gen.queries.grad.abs().sum() > 0  # through the frozen LM
    head = gen.dit if loss == "flow" else gen.mse
    assert all(p.grad is not None for p in head.parameters())
    assert all(p.grad is None for p in vlm.parameters())
    assert all(p.grad is None for p in clip.parameters())
    vlm.requires_grad_(True)


def test_noise_repeats_share_one_lm_pass_between_several_dit_samples(parts, monkeypatch):
    tok, cfg, clip, vlm, images = parts
    vlm.requires_grad_(False).eval()
    gen = blip3o.Generator(cfg, loss="flow", target_dim=cfg.clip.width)
    ids, lens, _ = blip3o.encode_prompts(tok, ["a red circle", "two squares", "a blue triangle"], 16)
    calls, seen = [], {}
    monkeypatch.setattr(gen, "condition", lambda *a: calls.append(1) or blip3o.Generator.condition(gen, *a))
    flow = blip3o.flow_matching_loss

    def spy(model, x1, cond, *a, **k):
        seen.update(x1=x1, cond=cond)
        return flow(model, x1, cond, *a, **k)

    monkeypatch.setattr(blip3o, "flow_matching_loss", spy)
    target = clip.tokens(images)
    value, _, _ = gen.loss(vlm.lm, ids, lens, target, noise_repeats=2, rng=torch.Generator().manual_seed(0))
    assert len(calls) == 1 and seen["cond"].shape[0] == 6  # one LM pass, six DiT samples
    # Copies of one tensor (repeat_interleave) and one elementwise division: bit-equal.
    assert torch.equal(seen["x1"][0::2], seen["x1"][1::2])  # each target twice, in place
    assert torch.equal(seen["x1"][0::2], target / gen.target_scale)
    assert torch.equal(seen["cond"][0::2], seen["cond"][1::2])
    assert value.ndim == 0 and value > 0  # a flow loss on random targets: positive
    vlm.requires_grad_(True)


def test_checkpoint_round_trip_gives_identical_outputs(parts, tmp_path):
    tok, cfg, clip, vlm, images = parts
    gen = blip3o.Generator(cfg, loss="flow", target_dim=cfg.clip.width).eval()
    tensors = {**pipeline.module_tensors("clip", clip), **pipeline.module_tensors("vlm", vlm),
               **pipeline.module_tensors("generator", gen)}
    pipeline.save_checkpoint(tmp_path / "ckpt", tensors, {"stage": "test", "config": cfg.to_dict()})
    meta, loaded, _ = pipeline.load_checkpoint(tmp_path / "ckpt", stage="test")
    cfg2 = blip3o.Config.from_dict(meta["config"])
    assert cfg2 == cfg
    clip2 = blip3o.ImageEncoder(cfg2.clip).eval()
    vlm2 = blip3o.VisionLanguageModel(blip3o.build_backbone(cfg2.lm), cfg2.clip.width, vlm.image_token_id,
                                      cfg2.lm.image_merge).eval()
    gen2 = blip3o.Generator(cfg2, loss="flow", target_dim=cfg2.clip.width).eval()
    for module, prefix in ((clip2, "clip"), (vlm2, "vlm"), (gen2, "generator")):
        pipeline.load_module(module, loaded, prefix)
    # Bit identity is the property of the weights (copied through safetensors) ...
    for module, module2 in ((clip, clip2), (vlm, vlm2), (gen, gen2)):
        state2 = module2.state_dict()
        assert all(torch.equal(v, state2[k]) for k, v in module.state_dict().items())
    # ... not of the outputs of two module instances: the CPU library picks its kernels by the tensors'
    # memory layout and alignment, so the same fp32 weights can sum in another order (~1e-7 relative).
    vlm.eval()
    close = dict(rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(clip.tokens(images), clip2.tokens(images), **close)
        ids, _, _ = blip3o.build_qa_batch(tok, vlm.image_tokens(64), ["what color is the circle ?"] * 3)
        torch.testing.assert_close(vlm(ids, clip.tokens(images))[1], vlm2(ids, clip.tokens(images))[1], **close)
        x, t, c = torch.randn(3, 64, cfg.clip.width), torch.rand(3), torch.randn(3, 64, cfg.lm.hidden_size)
        torch.testing.assert_close(gen.dit(x, t, c), gen2.dit(x, t, c), **close)


def test_wrong_checkpoint_names_what_differs(parts):
    tok, cfg, clip, vlm, images = parts
    tensors = pipeline.module_tensors("clip", clip)
    key = next(iter(tensors))
    tensors[key] = torch.zeros(7)
    with pytest.raises(pipeline.CheckpointError, match="shape mismatch"):
        pipeline.load_module(blip3o.ImageEncoder(cfg.clip), tensors, "clip")


def test_encode_prompts_wraps_the_caption_in_the_template_and_cuts_to_length(parts):
    """The one prompt encoder: <bos> + the templated caption, right-padded, no <eos> (the queries follow);
    a given length cuts longer prompts and the untruncated lengths still say how long they were."""
    tok = parts[0]
    captions = ["a red circle", "two squares and a blue triangle"]
    texts = [blip3o.PROMPT_TEMPLATE.format(c) for c in captions]
    ids, lens, full = blip3o.encode_prompts(tok, captions)
    assert torch.equal(lens, full) and ids.shape == (2, int(full.max()))
    expected, expected_lens = blip3o.encode_texts(tok, texts, ids.shape[1], bos=True, eos=False)
    assert torch.equal(ids, expected) and torch.equal(lens, expected_lens)
    cut, cut_lens, cut_full = blip3o.encode_prompts(tok, captions, 12)
    assert torch.equal(cut, ids[:, :12]) and cut_lens.tolist() == [12, 12] and torch.equal(cut_full, full)
