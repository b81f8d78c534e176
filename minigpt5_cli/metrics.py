"""The evaluation metrics as a Python API: each a documented function on plain inputs (strings, PIL
images, arrays), and the loaders of the networks some of them need.

- text: `tokens`, `bleu`, `char_bleu`, `rouge_l`, `meteor` (with `load_wordnet`), `sbert` (with
  `load_sbert`); MiniGPT-5's own: `minigpt5_clean`, `rouge_l_minigpt5`, `group_means`;
- images: `clip_i`, `clip_t` (with `load_clip`), `cosine`, `mm_relevance`, `element_score`,
  `mm_relevance_minigpt5`, `frechet_distance`, `feature_stats`, `fid`, `inception_score`,
  `inception_features` (with `load_inception`);
- `bootstrap_ci`.

Per-pair metrics return one score per pair; the reported value is their mean. Loaders take a hub id
or a local folder or file, and raise `UserError` naming the model and the command-line option that
points to a local copy when the model is not available.

    >>> from minigpt5_cli.metrics import bleu, rouge_l, tokens
    >>> rouge_l(["a red circle ."], ["a red square ."])
    [0.75]
"""

from minigpt5_cli.evaluation.loaders import (CLIP, CLIP_DEFAULT, CLIP_MMDIALOG, default_sbert, load_clip,  # noqa: F401
                                              load_inception, load_sbert, sha256, weights_label)
from minigpt5_cli.evaluation.maths import (MISSING, SPURIOUS, bleu, bootstrap_ci, char_bleu, clip_i,  # noqa: F401
                                            clip_t, cosine, element_score, feature_stats, fid, frechet_distance,
                                            group_means, inception_features, inception_score, meteor, minigpt5_clean,
                                            mm_relevance, mm_relevance_minigpt5, rouge_l, rouge_l_minigpt5, sbert,
                                            tokens)
from minigpt5_cli.evaluation.wordnet import load_wordnet  # noqa: F401
