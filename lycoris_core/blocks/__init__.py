"""Per-block strengths: block maps per architecture, block-strength specs, a block analyser.

Block ids
---------
Every module (file name or host model key) belongs to one block (`block_of`; rules in `names`):

- text encoders: `BASE`, or `T5` for T5-family encoders (Flux/SD3/Wan);
- SD1.x/2.x and SDXL UNet (LDM or diffusers paths, same ids): `IN00`…`IN11`, `M00`,
  `OUT00`…`OUT11` (SDXL: `IN00`…`IN08`, `OUT00`…`OUT08`);
- DiTs: `IN` (input embedders: `img_in`, `txt_in`, `x_embedder`, `context_embedder`, …), `OUT`
  (final layer), and one id per numbered container entry, `<code><NN>`, the code being the
  initials of the container name without "blocks/layers": Flux/Chroma/HunyuanVideo `D00`…,
  `S00`…; SD3 `J00`…; Wan `B00`…; Qwen-Image/PixArt `T00`…; HiDream `DS00`…, `SS00`…;
  Lumina `L00`…, `NR00`…, `CR00`… — so new DiTs get per-block control with no code change;
- `OTHER`: diffusion-model modules outside every block (time/label embeddings, SD `conv_out`).

A host model key, when given, is authoritative; file names in diffusers layout are read with the
file's family (`detect_arch`), e.g. diffusers Flux `transformer_blocks.3` -> `D03`.

Spec grammar
------------
A spec is text, JSON text, or a `{selector: value}` mapping. Text is items separated by `,`, `;`
or newlines; blank items are ignored; names are case-insensitive. Items, applied in order, a
later item overriding an earlier one wherever both apply::

    spec      := item ((',' | ';' | NEWLINE) item)*
    item      := PRESET                      NONE, ALL, ALL0.5, INS, IND, INALL, MIDD, OUTD,
                                             OUTS, OUTALL, FLUXALL, or a name in `presets=`
               | vector                      NUMBER × 17 | 26 (SD) | 12 | 20 (SDXL) | 61 (Flux)
               | LABEL ':' vector            a preset-file line `NAME:v1,…`; the label is ignored
               | selector '=' NUMBER
               | 'default' '=' NUMBER        the value where no item applies (else 1)
    selector  := BLOCK                       IN04, M00, OUT11, D07, S37, J03, B12, T5 (IN4 = IN04)
               | GROUP                       ALL (every block but OTHER), BASE | TE (every text
                                             encoder), CLIP (the non-T5 ones), IN, MID | M, OUT,
                                             D | DOUBLE, S | SINGLE, J | JOINT, any code (B, T, DS…)
               | BLOCK '-' (BLOCK | DIGITS)  inclusive range: IN04-IN08, IN04-08, D00-D09;
                                             across families only inside the SD or Flux list
                                             (IN10-OUT02, D17-S01)
               | 're:' PATTERN               Python regex searched in the module name (and the
                                             model key when given); a `,` in it must sit inside
                                             (), [] or {} or follow a backslash

Vectors are matched to blocks by NAME through the LBW layout of their length (17: BASE IN01 IN02
IN04 IN05 IN07 IN08 M00 OUT03…OUT11; 26: BASE IN00…IN11 M00 OUT00…OUT11; 12: BASE IN04 IN05 IN07
IN08 M00 OUT00…OUT05; 20: BASE IN00…IN08 M00 OUT00…OUT08; 61: CLIP T5 IN D00…D18 S00…S37 OUT),
never by position in the file; blocks a file lacks are simply absent. Deliberate difference from
LBW: blocks a short vector does not list keep their value (1) instead of being zeroed, so a
17-value vector no longer switches off the conv blocks of a LoCon; `lbw_compat=True` restores the
zero-fill (over the 26/20/61 list of the vector's family) for vectors and built-in presets.

Built-in presets are rules (see `PRESETS`): NONE = `ALL=0`, ALL = `ALL=1`, ALL0.5 = `ALL=0.5`,
INALL = `ALL=0, TE=1, IN=1`, OUTALL = `ALL=0, TE=1, OUT=1`, and INS/IND/MIDD/OUTD/OUTS = `ALL=0,
TE=1` plus the blocks of their LBW 17-vector. On the 17 LBW blocks each equals LBW's vector; on
the blocks LBW's vectors leave out (conv-only IN00/03/06/09-11 and OUT00-02, SDXL's OUT00-02) the
ALL* presets mean what their name says. `OTHER` is changed only by `OTHER=` and `default=`.

Random/variable LBW values (R, U, X, A, B) are rejected. Every error is a BlockSpecError
(a ValueError) whose message names the bad token.

Application
-----------
`BlockStrengths.strength(module_name, model_key=None)` is the multiplier of one module;
`scaled_strengths(file, spec, strength)` gives `strength × multiplier` for every module. Because
each Adapter's merge is affine in strength, passing that number to `merge`/`bypass` gives
`W + s_k·(W(1) − W)` for every algorithm: additive ones scale ΔW, OFT/BOFT interpolate their
rotation per block, DoRA interpolates its normalised weight.
"""
from .analyse import BlockChange, analyse, format_analysis
from .archs import ARCHS, LAYOUTS, Arch, block_of, blocks_present, detect_arch, module_blocks
from .names import block_group, group_title, is_known_name
from .spec import (PRESETS, BlockSpecError, BlockStrengths, parse_presets, parse_spec,
                   preset_vector, scaled_strengths)

__all__ = ["ARCHS", "Arch", "BlockChange", "BlockSpecError", "BlockStrengths", "LAYOUTS",
           "PRESETS", "analyse", "block_group", "block_of", "blocks_present", "detect_arch",
           "format_analysis", "group_title", "is_known_name", "module_blocks", "parse_presets",
           "parse_spec", "preset_vector", "scaled_strengths"]
