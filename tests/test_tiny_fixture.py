def test_tiny_base_loads_and_generates(tiny_base):
    from adapterctl.basemodel import load_model, load_tokenizer

    model = load_model(tiny_base)
    tok = load_tokenizer(tiny_base)
    ids = tok("The movie was", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] == ids.shape[1] + 5 or out[0, -1].item() in (1, 106)
    assert tiny_base.fingerprint.startswith("sha256:") and len(tiny_base.fingerprint) == 71
