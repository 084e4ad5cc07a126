"""A small Llama-style tokenizer trained offline, so random-weight presets need nothing from a model hub.

Byte-level BPE (every string encodes, no `<unk>` at run time) trained on a built-in corpus: the LLaVA system
prompt, the classification prompt template and some English, so prompts and labels tokenize into a few hundred
ids. Special tokens follow the llava-hf layout: `<unk>`=0, `<s>`=1, `</s>`=2 first, the BPE vocabulary, then
`<image>` and `<pad>` (added last, as transformers' LLaVA conversion adds them to the Vicuna vocabulary). A `<s>`
is prepended to every encoded text, as LlamaTokenizer does. Training is deterministic: the same vocabulary size
gives the same `tokenizer.json`.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AddedToken, PreTrainedTokenizerFast

SPECIALS = ("<unk>", "<s>", "</s>")
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"

_CORPUS = """
A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, detailed,
and polite answers to the human's questions. A chat between a curious user and an artificial intelligence
assistant. The assistant gives helpful, detailed, and polite answers to the user's questions. USER: ASSISTANT:
Classify this image into one of the following categories relating to plant leaf diseases, textures, skin
diseases, humanitarian categories of disaster images, the image's category. Only output a single final
classification label and NOTHING ELSE. Output: This is a photo of a
banded blotchy braided bubbly bumpy chequered cobwebbed cracked crosshatched crystalline dotted fibrous flecked
freckled frilly gauzy grid grooved honeycombed interlaced knitted lacelike lined marbled matted meshed paisley
perforated pitted pleated polka-dotted porous potholed scaly smeared spiralled sprinkled stained stratified
striped studded swirly veined waffled woven wrinkled zigzagged
Apple Scab Leaf, Apple leaf, Apple rust leaf, Bell pepper leaf spot, Bell pepper leaf, Blueberry leaf, Cherry
leaf, Corn Gray leaf spot, Corn leaf blight, Corn rust leaf, Peach leaf, Potato leaf early blight, Potato leaf
late blight, Raspberry leaf, Soyabean leaf, Squash Powdery mildew leaf, Strawberry leaf, Tomato Early blight
leaf, Tomato Septoria leaf spot, Tomato leaf bacterial spot, Tomato leaf late blight, Tomato leaf mosaic virus,
Tomato leaf yellow virus, Tomato mold leaf, Tomato two spotted spider mites leaf, grape leaf black rot.
Acne and Rosacea Photos, Actinic Keratosis Basal Cell Carcinoma and other Malignant Lesions, Atopic Dermatitis,
Bullous Disease, Cellulitis Impetigo and other Bacterial Infections, Eczema, Exanthems and Drug Eruptions, Hair
Loss Alopecia, Herpes HPV and other STDs, Light Diseases and Disorders of Pigmentation, Lupus and other
Connective Tissue diseases, Melanoma Skin Cancer Nevi and Moles, Nail Fungus, Poison Ivy and other Contact
Dermatitis, Psoriasis pictures Lichen Planus, Scabies Lyme Disease and other Infestations and Bites, Seborrheic
Keratoses and other Benign Tumors, Systemic Disease, Tinea Ringworm Candidiasis and other Fungal Infections,
Urticaria Hives, Vascular Tumors, Vasculitis, Warts Molluscum and other Viral Infections.
affected individuals, infrastructure and utility damage, rescue volunteering or donation effort, vehicle damage,
injured or dead people, missing or found people, not humanitarian, other relevant information.
The quick brown fox jumps over the lazy dog. What is shown in the picture? Describe the image in detail.
0 1 2 3 4 5 6 7 8 9 10 100 1000 "quoted", (parenthesis), [brackets]; colon: semicolon; question? exclamation!
"""


def train_bpe(vocab_size: int = 1024, llava_tokens: bool = True):
    """A `tokenizers.Tokenizer` with the layout above; deterministic for a given `vocab_size`. Without
    `llava_tokens` it is a plain Llama-style vocabulary, like Vicuna's before LLaVA's conversion."""

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    lines = [ln for ln in _CORPUS.strip().splitlines() if ln.strip()]
    # Repeat so common words outrank one-off pairs; the result depends only on the text, not on timing.
    tok.train_from_iterator(lines * 4, trainer=trainer)
    if llava_tokens:
        tok.add_special_tokens([IMAGE_TOKEN, PAD_TOKEN])
    bos = tok.token_to_id("<s>")
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", bos)])
    return tok


def build_tokenizer(vocab_size: int = 1024, llava_tokens: bool = True):
    """A transformers fast tokenizer (`AutoTokenizer.from_pretrained(dir)` loads what `save_pretrained` writes)."""

    extra = dict(pad_token=PAD_TOKEN, extra_special_tokens={"image_token": IMAGE_TOKEN}) if llava_tokens else {}
    return PreTrainedTokenizerFast(
        tokenizer_object=train_bpe(vocab_size, llava_tokens), bos_token="<s>", eos_token="</s>", unk_token="<unk>",
        padding_side="right", model_max_length=4096, clean_up_tokenization_spaces=False, **extra)


def ensure_llava_tokens(tokenizer) -> list[str]:
    """Add `<image>` and `<pad>` where missing, as transformers' LLaVA conversion does; returns what was added."""

    added = []
    vocab = tokenizer.get_vocab()
    if IMAGE_TOKEN not in vocab:
        tokenizer.add_tokens(AddedToken(IMAGE_TOKEN, special=True, normalized=False), special_tokens=True)
        added.append(IMAGE_TOKEN)
    if tokenizer.pad_token is None or PAD_TOKEN not in vocab:
        if PAD_TOKEN not in vocab:
            added.append(PAD_TOKEN)
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    return added
