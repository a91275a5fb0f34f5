"""The studies made on the toy world: how the toy model and its encoders were made, and the gates they
were measured against (`docs/toy-world.md`, `docs/toy-world-v2.md`).

| module | what |
|---|---|
| `pretrain` | pretraining the miniature Stable Diffusion of `assets/toy-sd` (`elite-toy-pretrain`) |
| `report` | what the pretrained toy model can do: probes, prompt adherence, timings (`elite-toy-report`) |
| `encoder` | retraining the toy image encoder on box views |
| `compounds` | teaching the toy text encoder compound words; fitting a mapper onto them |
| `mappable` | whether a map from image features to words exists (gate 3) |
| `gates` | the toy world's gates, each written into `results/` |
| `judge_check` | a second reader of the attributes, checking the judge on generated images (`docs/judge-check.md`) |

They sit above `evaluation` and `baselines`, which they use; the world (`toyworld`), the core and
evaluation import none of them. Until the package was split this way they were `elite_tutorial.toyworld.<study>`,
and records written then say `python -m elite_tutorial.toyworld.<study> ...`: the same command is now
`python -m elite_tutorial.studies.<study> ...`.
"""
