"""The toy world: what the `toy` preset's miniature Stable Diffusion was made for and is measured in.

| module | what |
|---|---|
| `render` | scenes: objects (shape, colour, pattern, size, position), backgrounds, captions |
| `concepts` | the personal concepts, held out of every training source, in the authors' folder layout |
| `tokenizer` | a real `CLIPTokenizer` trained on a short word list |
| `models` | the miniature models' configurations; the `tiny-random` preset's folder |
| `judge` | the classifier that reads every attribute of an image (evaluation), and a second reader that checks it |
| `sources` | the toy training sources of ELITE's mappers (`ToyWorldSource`) |

The world lies low (docs/layers.md): it imports nothing above `data`, `components` and `storage`, so
the core and evaluation can use it. How the toy model was made and gated is `elite_tutorial.studies`.
"""
