"""Chapter 01: one typical mistake per exercise, keyed by its check's name; each must fail its check with a message
(tests/test_exercises.py). Each source defines the exercise's function, written wrong."""

MISTAKES = {
    # 01: the patch tokens averaged before their MLP; the placeholder looked up in the first prompt only;
    # the L1 term summed instead of averaged
    "level_word": """
def level_word(level, mapping, mapping_patch):
    return mapping(level[:, :1]) + mapping_patch(level[:, 1:].mean(dim=1, keepdim=True))
""",
    "inject_words": """
def inject_words(token_embeddings, input_ids, placeholder_id, words):
    injected = token_embeddings.clone()
    positions = (input_ids[0] == placeholder_id).nonzero()[:, 0]
    injected[:, positions] = words
    return injected
""",
    "stage1_losses": """
def stage1_losses(components, mapper, batch, reg_weight, noise_scheduler, generator):
    import torch
    import torch.nn.functional as F

    from elite_tutorial.data import clip_normalise
    from elite_tutorial.mappers import clip_feature_levels
    from elite_tutorial.words import encode_prompts_with_words

    c = components
    with torch.no_grad():
        latents = c.vae.encode(batch["pixel_values"]).latent_dist.sample(generator) * c.vae.config.scaling_factor
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(latents),), generator=generator)
        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
        levels = clip_feature_levels(c.image_encoder, clip_normalise(batch["clip_pixels"]))
    words = mapper(levels)
    context = encode_prompts_with_words(batch["prompts"], words, c.tokenizer, c.text_encoder)
    prediction = c.unet(noisy, timesteps, encoder_hidden_states=context).sample
    return {"loss_mle": F.mse_loss(prediction, noise), "loss_reg": reg_weight * words.abs().sum()}
""",
}
