"""The shapes world: determinism, the held-out split, captions, questions, vocabulary, torch datasets."""
import random

import numpy as np
import pytest
import torch

import blip3o
import data


def test_make_scene_is_a_pure_function_of_its_arguments():
    a = data.make_scene(17, "train", seed=3)
    b = data.make_scene(17, "train", seed=3)
    assert a == b
    assert np.array_equal(data.draw(a), data.draw(b))
    # tag None cycles through TAGS and equals asking for that tag explicitly
    assert a == data.make_scene(17, "train", seed=3, tag=data.TAGS[17 % len(data.TAGS)])
    assert a != data.make_scene(17, "train", seed=4)


def test_same_index_differs_between_splits():
    for i in range(50):
        assert data.make_scene(i, "train").objects != data.make_scene(i, "test").objects


def test_scene_geometry_follows_the_rules():
    for i in range(600):
        scene = data.make_scene(i, "train" if i % 2 else "test")
        assert 1 <= len(scene.objects) <= 4
        for o in scene.objects:
            x0, y0, x1, y1 = o.box
            assert x1 - x0 == y1 - y0 and x1 - x0 in (8, 12)  # 2x2 or 3x3 patches
            assert all(v % 4 == 0 for v in o.box)  # on the 4-pixel patch lattice
            assert x0 >= 0 and y0 >= 0 and x1 <= 32 and y1 <= 32
        for a in scene.objects:
            for b in scene.objects:
                if a is not b:
                    assert data._apart(a.box, b.box, 4)  # at least one patch of background between


def test_token_labels_name_the_object_under_each_patch():
    scene = data.make_scene(3)
    colour, shape, box = data.token_labels(scene)
    assert colour.shape == shape.shape == (64,) and box.shape == (64, 4)
    on = shape < len(data.SHAPES)
    # Every object token carries its object's colour, shape and box; background tokens carry none.
    for o in scene.objects:
        x0, y0, x1, y1 = (v // 4 for v in o.box)
        cells = [r * 8 + c for r in range(y0, y1) for c in range(x0, x1)]
        inside = [i for i in cells if on[i]]
        assert inside, "every object owns at least one token"
        for i in inside:
            assert data.COLORS[colour[i]] == o.color and data.SHAPES[shape[i]] == o.shape
            np.testing.assert_array_equal(box[i], np.array(o.box, dtype=np.float32) / 32)
    assert (colour[~on] == len(data.COLORS)).all() and (box[~on] == 0).all()
    # A patch a circle only grazes (its corner) is background: less than a quarter of it is covered.
    assert on.sum() <= sum(((o.box[2] - o.box[0]) // 4) ** 2 for o in scene.objects)


def test_drawing_has_exact_colours_only():
    img = data.draw(data.make_scene(5))
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    palette = {tuple(rgb) for rgb in data.COLOR_RGB.values()} | {data.BACKGROUND}
    assert {tuple(p) for p in img.reshape(-1, 3)} <= palette
    t = data.to_tensor(img)
    assert t.shape == (3, 32, 32) and t.dtype == torch.float32 and 0 <= t.min() and t.max() <= 1


def test_image_size_scales_the_world():
    scene = data.make_scene(3, image_size=64)
    assert data.draw(scene).shape == (64, 64, 3)
    assert all(16 <= o.box[2] - o.box[0] <= 28 for o in scene.objects)
    with pytest.raises(ValueError):
        data.draw(scene, image_size=32)


def _combos(scene):
    return {data._combo((a.color, a.shape), (b.color, b.shape))
            for a in scene.objects for b in scene.objects if a.shape != b.shape}


def test_heldout_choices_leave_every_pair_and_most_compositions_in_training():
    all_combos = {data._combo((c1, s1), (c2, s2)) for s1 in data.SHAPES for s2 in data.SHAPES if s1 < s2
                  for c1 in data.COLORS for c2 in data.COLORS}
    assert len(all_combos) == 300
    assert data.HELDOUT_COMBOS < all_combos and 30 <= len(data.HELDOUT_COMBOS) <= 75
    # every (colour, shape) pair still meets most partners in training
    for c in data.COLORS:
        for s in data.SHAPES:
            partners = [x for x in all_combos if (c, s) in x]
            assert sum(x not in data.HELDOUT_COMBOS for x in partners) >= len(partners) // 2
    for a, rel, b in data.HELDOUT_RELATIONS:
        assert a != b and rel in data.RELATIONS


def _shown_relations(scene):
    return {(a.shape, rel, b.shape) for a in scene.objects for b in scene.objects
            if a.shape != b.shape for rel in data.relative_position(a.box, b.box)}


def test_train_stream_never_shows_a_heldout_composition():
    images, scenes = data.make_image_set(20000, "train")
    assert images.shape == (20000, 3, 32, 32)
    for scene in scenes:
        assert not _combos(scene) & data.HELDOUT_COMBOS
        assert not _shown_relations(scene) & data.HELDOUT_RELATIONS
        if scene.tag == "position":
            inc = scene.metadata["include"]
            assert (inc[1]["class"], inc[1]["position"][0], inc[0]["class"]) not in data.HELDOUT_RELATIONS


def test_test_split_holds_heldout_compositions():
    for i in range(1200):
        scene = data.make_scene(i, "test")
        if len({o.shape for o in scene.objects}) > 1:
            assert _combos(scene) & data.HELDOUT_COMBOS
        if scene.tag == "position":
            inc = scene.metadata["include"]
            assert (inc[1]["class"], inc[1]["position"][0], inc[0]["class"]) in data.HELDOUT_RELATIONS
        if scene.tag == "color_attr":
            a, b = scene.metadata["include"]
            assert data._combo((a["color"], a["class"]), (b["color"], b["class"])) in data.HELDOUT_COMBOS


@pytest.mark.parametrize("split", ["train", "test"])
def test_every_scene_satisfies_its_prompt(split):
    for i in range(600):
        scene = data.make_scene(i, split)
        ok, reason = data.score_record(scene.metadata, data.detect_objects(data.draw(scene)))
        assert ok, (scene.prompt, reason)


def test_prompts_follow_geneval_phrasing():
    prompts = {data.make_scene(i, "train", tag=tag).prompt for i in range(200) for tag in data.TAGS}
    assert "a photo of a circle" in prompts
    assert "a photo of three squares" in prompts
    assert "a photo of an orange circle" in prompts
    assert any(" left of " in p for p in prompts)
    assert not any(" a orange" in p for p in prompts)


def test_caption_names_every_object():
    for i in range(300):
        scene = data.make_scene(i)
        words = scene.caption.split()
        for o in scene.objects:
            assert o.color in words
            assert o.shape in words or data.plural(o.shape) in words
    two = [data.Obj("circle", "red", (2, 10, 10, 18)), data.Obj("square", "blue", (20, 10, 28, 18))]
    assert data.caption_for(two) == "a red circle left of a blue square"


def _all_text(n=1500):
    rng = random.Random(0)
    for split in ("train", "test"):
        for i in range(n):
            scene = data.make_scene(i, split)
            yield scene.prompt
            yield scene.caption
            for _, q, a in data.make_qa(scene, rng):
                yield q
                yield a
    yield data.caption_question
    yield blip3o.PROMPT_TEMPLATE.format("a red circle")


def test_vocab_covers_every_word():
    vocab = set(data.VOCAB)
    assert data.VOCAB == sorted(vocab)
    assert {"caption", ":", "?", "please"} <= vocab
    texts = list(_all_text())
    assert blip3o.unknown_words(blip3o.build_toy_tokenizer(data.VOCAB), texts) == []
    assert not any("," in text for text in texts)


def test_questions_are_unambiguous_and_correct():
    rng = random.Random(0)
    seen = set()
    for i in range(600):
        scene = data.make_scene(i)
        for qtype, q, a in data.make_qa(scene, rng):
            seen.add(qtype)
            assert qtype in data.QTYPES and len(a.split()) == 1
            words = q.split()
            if qtype == "color":
                (obj,) = [o for o in scene.objects if o.shape == words[4]]
                assert a == obj.color
            elif qtype == "shape":
                (obj,) = [o for o in scene.objects if o.color == words[4]]
                assert a == obj.shape
            elif qtype == "count" and words[2] != "objects":
                assert a == data.NUMBER_WORDS[sum(data.plural(o.shape) == words[2] for o in scene.objects)]
            elif qtype == "position":
                (oa,) = [o for o in scene.objects if o.shape == words[3]]
                (ob,) = [o for o in scene.objects if o.shape == words[7]]
                assert data.relative_position(oa.box, ob.box) == {data.clear_relation(oa.box, ob.box)}
                assert data.clear_relation(oa.box, ob.box).split()[0] == a
    assert seen == set(data.QTYPES)


def test_make_image_set_matches_scenes_and_tags():
    images, scenes = data.make_image_set(12, "test", seed=2, tags=("counting", "colors"))
    assert images.dtype == torch.uint8 and images.shape == (12, 3, 32, 32)
    assert [s.tag for s in scenes] == ["counting", "colors"] * 6
    assert torch.equal(images[5], torch.from_numpy(data.draw(scenes[5])).permute(2, 0, 1))


def test_text_rows_ask_only_what_their_text_states():
    """Stage 1's text-only conversations (train.text_qa_table): every answer can be read off the prompt."""
    import train
    scenes = [data.make_scene(i) for i in range(240)]
    rows = train.text_qa_table(scenes, 0, blip3o.PROMPT_TEMPLATE)
    assert len(rows) == 2 * len(scenes)
    relations = {"left": "right", "right": "left", "above": "below", "below": "above"}
    for k, turns in enumerate(rows):
        scene = scenes[k // 2]
        text = (scene.caption, scene.prompt)[k % 2]
        assert turns[0][0].startswith(blip3o.PROMPT_TEMPLATE.format(text) + " . ")
        words = text.split()
        for q, a in turns:
            q = q.split(" . ")[-1].split()
            if q[:2] == ["what", "color"]:  # what color is the <shape> ?
                assert a in words and q[4] in words
            elif q[:2] == ["what", "shape"]:  # what shape is the <color> object ?
                assert q[4] in words and (a in words or data.plural(a) in words)
            elif q[0] == "where":  # where is the <a> relative to the <b> ?
                assert q[3] in words and q[7] in words
                assert a in words or relations[a] in words
            else:
                assert q[:2] == ["how", "many"]
