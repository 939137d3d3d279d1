"""Every constant of the flash GGUF format (DESIGN.md section 3) in one place."""

from __future__ import annotations

from gguf import GGMLQuantizationType

# Version 4 (this converter writes it): the gate may be resident (flashgguf.gate.resident):
# then bundle rows hold only up and down, and each layer's gate matrix is its own tensor
# (ffn_gate_rows), rows in bundle order, which the runtime keeps in DRAM to choose each
# token's rows from its exact gate values.
# Version 3: K-quant and Q5 bundle parts, and layers may have
# their own bundle layouts (K-quant mixes such as Q4_K_M keep some layers' down tensors in
# Q6_K, others in Q4_K): then bundle.types and .offsets hold n_layer x n_parts values,
# layer-major, and bundle.stride is an array with one per layer.
# Version 2: the predictor may store per-neuron residuals (pred_sigma_g/u) that change its
# score. Versions 1 and 2 (one layout for every layer) are still read; an older reader
# refuses a newer file.
FORMAT_VERSION = 4
# Version 5: mixture-of-experts files (flashgguf.moe.*): each layer's routed experts are one
# tensor of expert bundles in the source's own quant types. Dense files stay version 4.
MOE_VERSION = 5
# Version 6: split rows (flashgguf.bundle.split, with a resident gate): a layer's bundle tensor
# holds its n_ff up rows first, then its n_ff down rows, so that each is read on its own
# (flash_mode "gate" reads the down rows only for the neurons whose exact up x act(gate)
# passes a second cut: two stages). The layout keys keep their meaning for one neuron: up at
# offset 0, down at the up rows' stride (offsets[down]), stride = up + down strides. Each
# layer also stores its down columns' norms (ffn_down_norm). Unsplit dense files stay version 4.
SPLIT_VERSION = 6
READABLE_VERSIONS = (1, 2, 3, 4, 5, 6)
PER_LAYER_LAYOUT_VERSION = 3
GATE_RESIDENT_VERSION = 4

# Trunk (GGUF #1): a llama.cpp model whose architecture name stock llama.cpp refuses.
TRUNK_ARCH = "flashgguf"
PAYLOAD_ARCH = "flashgguf-payload"
DUMMY_FFN_WIDTH = 32

KEY_ARCHITECTURE = "general.architecture"
KEY_ALIGNMENT = "general.alignment"
# the trunk's tokenizer arrays, checked before llama.cpp loads them
KEY_TOKENIZER_TOKENS = "tokenizer.ggml.tokens"
KEY_TOKENIZER_SCORES = "tokenizer.ggml.scores"
KEY_TOKENIZER_TOKEN_TYPES = "tokenizer.ggml.token_type"
KEY_VERSION = "flashgguf.version"
KEY_ARCH = "flashgguf.arch"
KEY_PAYLOAD_OFFSET = "flashgguf.payload.offset"
KEY_PAYLOAD_SIZE = "flashgguf.payload.size"

# Payload (GGUF #2), appended at a 4096-aligned offset.
PAYLOAD_ALIGNMENT = 4096
KEY_BLOCK_COUNT = "flashgguf.block_count"
KEY_EMBEDDING_LENGTH = "flashgguf.embedding_length"
KEY_FEED_FORWARD_LENGTH = "flashgguf.feed_forward_length"
KEY_ACTIVATION = "flashgguf.ffn.activation"
KEY_ACTIVATION_THRESHOLD = "flashgguf.ffn.activation_threshold"  # fatrelu's (float32)
KEY_GATED = "flashgguf.ffn.gated"
KEY_GATE_RESIDENT = "flashgguf.gate.resident"  # bool, version 4: gate rows not in the bundle
KEY_BUNDLE_PARTS = "flashgguf.bundle.parts"
KEY_BUNDLE_TYPES = "flashgguf.bundle.types"
KEY_BUNDLE_OFFSETS = "flashgguf.bundle.offsets"
KEY_BUNDLE_STRIDE = "flashgguf.bundle.stride"
KEY_BUNDLE_SPLIT = "flashgguf.bundle.split"  # bool, version 6: up rows, then down rows
KEY_SOURCE_NAME = "flashgguf.source.name"
KEY_SOURCE_SHA256 = "flashgguf.source.sha256"
KEY_DOWN_REQUANT_ERROR = "flashgguf.bundle.down_requant_rel_error"

# Optional (gate-resident files converted with --calibrate): per layer, the relative FFN
# output error of keeping each token's top share of rows by |act(gate)|, for a grid of shares,
# on held-out calibration inputs; flattened [n_layer * K], layer-major. flash_gate_keep is
# spread over the layers from it (flashgguf/gate_keep.py). Readers before it ignore the keys.
KEY_GATE_CURVE_KEEP = "flashgguf.gate.curve.keep"  # f32 [K], ascending, in (0, 1]
KEY_GATE_CURVE_ERROR = "flashgguf.gate.curve.error"  # f32 [n_layer * K], >= 0
GATE_CURVE_KEEPS = tuple(round(0.3 + 0.05 * i, 2) for i in range(15))  # 0.3 ... 1.0

# Mixture of experts (version 5). Per layer, ffn_experts is I8 [stride, n_expert]: expert e's
# bundle at e x stride holds its gate (n_ff_exp rows of n_embd), up (the same) and down (n_embd
# rows of n_ff_exp) as the source stores them, at the part offsets; the stride is a multiple
# of PAYLOAD_ALIGNMENT so that every expert is one aligned direct read. The trunk keeps the
# router and any shared expert (llama.cpp routes); its routed expert tensors have the dummy
# width DUMMY_EXPERT_WIDTH (they hold n_expert copies: width 1 keeps them small).
KEY_MOE_EXPERT_COUNT = "flashgguf.moe.expert_count"
KEY_MOE_EXPERT_USED_COUNT = "flashgguf.moe.expert_used_count"
KEY_MOE_TYPES = "flashgguf.moe.types"  # u32 [n_layer x 3]: gate, up, down
KEY_MOE_OFFSETS = "flashgguf.moe.offsets"  # u32 [n_layer x 3]: byte offsets in a bundle
KEY_MOE_STRIDE = "flashgguf.moe.stride"  # u32 [n_layer]: bytes per expert bundle
# optional, from `--calibrate` (with KEY_CALIBRATION_TOKENS and _TEXT_SHA256): f32
# [n_layer x n_expert], the share of calibration tokens whose top-k held the expert (a
# layer's values sum to the experts used per token); the runtime pins the most used
KEY_MOE_FREQUENCY = "flashgguf.moe.frequency"
# with it, f32: the share of an expert cache to pin by default, measured by the converter on
# held-out calibration routing (0: pinning did not pay there)
KEY_MOE_PINNED_SHARE = "flashgguf.moe.pinned_share"
TENSOR_EXPERTS = "blk.{bid}.ffn_experts"
DUMMY_EXPERT_WIDTH = 1
# llama.cpp's LLAMA_MAX_EXPERTS (src/llama-hparams.cpp): more experts stop its loader with
# GGML_ASSERT, which would abort the host process, so the reader refuses them first
MAX_EXPERTS = 512
MOE_PARTS = ("gate", "up", "down")

TENSOR_BUNDLE = "blk.{bid}.ffn_bundle"
TENSOR_GATE_ROWS = "blk.{bid}.ffn_gate_rows"  # gate.resident: [n_embd, n_ff], bundle order
TENSOR_DOWN_NORM = "blk.{bid}.ffn_down_norm"  # split: F32 [n_ff], ||down column||, bundle order
TENSOR_ORDER = "blk.{bid}.ffn_order"
TENSOR_FREQ = "blk.{bid}.ffn_freq"
TENSOR_UP_BIAS = "blk.{bid}.ffn_up_b"
TENSOR_GATE_BIAS = "blk.{bid}.ffn_gate_b"
TENSOR_DOWN_BIAS = "blk.{bid}.ffn_down_b"

PART_GATE = "gate"
PART_UP = "up"
PART_DOWN = "down"

# Bundle part types the C kernels implement (scalar reference + SIMD).
BUNDLE_TYPES = {
    "f16": GGMLQuantizationType.F16,
    "q8_0": GGMLQuantizationType.Q8_0,
    "q6_k": GGMLQuantizationType.Q6_K,
    "q5_1": GGMLQuantizationType.Q5_1,
    "q5_k": GGMLQuantizationType.Q5_K,
    "q5_0": GGMLQuantizationType.Q5_0,
    "q4_1": GGMLQuantizationType.Q4_1,
    "q4_k": GGMLQuantizationType.Q4_K,
    "q4_0": GGMLQuantizationType.Q4_0,
}
# "auto" (gate/up and down): per layer, the source tensor's own type where it is a bundle
# type whose blocks divide the row, else the supported type closest to its bits per weight
# from below (convert/bundle.py: choose_part_type).
AUTO_TYPE = "auto"
DEFAULT_DOWN_TYPE = AUTO_TYPE
# Bundle rows are padded to this many bytes (measured choice, see BENCHMARKS.md).
DEFAULT_BUNDLE_ALIGN = 64

# fatrelu: x if x > threshold else 0 (ProSparse); drelu: relu on the gate and on up
# (TurboSparse, Bamboo).
ACTIVATIONS = ("silu", "gelu", "relu", "relu2", "fatrelu", "drelu")
THRESHOLD_ACTIVATIONS = ("fatrelu",)

# Activity predictor (flashgguf/predictor.py is its reference scoring).
KEY_PREDICTOR_KIND = "flashgguf.predictor.kind"
KEY_PREDICTOR_RANK = "flashgguf.predictor.rank"  # u32 per layer
KEY_PREDICTOR_THRESHOLD = "flashgguf.predictor.threshold"  # f32 per layer
KEY_PREDICTOR_RECALL = "flashgguf.predictor.recall"  # f32 per layer, held-out estimate
KEY_PREDICTOR_DENSITY = "flashgguf.predictor.density"  # f32 per layer: share predicted active
KEY_PREDICTOR_KEEP = "flashgguf.predictor.keep"  # f32: top share of contributions recalled
PREDICTOR_WEIGHT_SVD = "weight-svd"
# the same predictor fitted on FFN inputs collected from llama.cpp on calibration text
PREDICTOR_CALIBRATED_SVD = "calibrated-svd"
PREDICTOR_KINDS = (PREDICTOR_WEIGHT_SVD, PREDICTOR_CALIBRATED_SVD)
KEY_PREDICTOR_PRECISION = "flashgguf.predictor.precision"  # f32 per layer (calibrated)
KEY_CALIBRATION_TOKENS = "flashgguf.calibration.tokens"
KEY_CALIBRATION_TEXT_SHA256 = "flashgguf.calibration.text_sha256"
# Optional (SiLU/GELU predictors): the threshold for each recall target of a fixed grid,
# with the density and relative FFN output error measured for it on held-out inputs, per
# layer; flattened [n_layer * K], layer-major. flash_predictor_recall picks from it.
KEY_PREDICTOR_CURVE_RECALL = "flashgguf.predictor.curve.recall"  # f32 [K], ascending
KEY_PREDICTOR_CURVE_THRESHOLD = "flashgguf.predictor.curve.threshold"
KEY_PREDICTOR_CURVE_DENSITY = "flashgguf.predictor.curve.density"
KEY_PREDICTOR_CURVE_ERROR = "flashgguf.predictor.curve.error"
PREDICTOR_CURVE_RECALLS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995)
# The conversion report's expected FFN bytes read per token (f32 per layer, before window-
# cache hits) at a budget of this share of the payload (f32): the demo's and the benchmarks'
# middle budget (without a budget, flashgguf keeps a payload that fits in RAM resident).
KEY_PREDICTOR_EXPECTED_READ = "flashgguf.predictor.expected_read_bytes"
KEY_PREDICTOR_EXPECTED_BUDGET = "flashgguf.predictor.expected_read_budget"
REPORT_BUDGET_SHARE = 0.5
TENSOR_PRED_A = "blk.{bid}.pred_a"
TENSOR_PRED_B = "blk.{bid}.pred_b"
TENSOR_PRED_B_UP = "blk.{bid}.pred_b_up"
TENSOR_PRED_SCALE = "blk.{bid}.pred_scale"
# Defaults: keep 0.7 because an oracle keeping each token's top 70% of SmolLM2's neurons by
# contribution measured 1.00x perplexity (issue 3). Recall, measured token by token on SmolLM2 (then
# tools/tradeoff.py, now flashgguf-profile quality --recall; 400 tokens): the calibrated predictor
# at 0.95 computes 88% of the neurons at 1.027x stock perplexity (0.9: 80%, 1.034x); the weight-only
# one, whose recall is set on random inputs, needs 0.99 (99% computed, 1.005x; 0.95 gave 1.26x).
DEFAULT_PREDICTOR_KEEP = 0.7
DEFAULT_PREDICTOR_RECALL = 0.95
DEFAULT_WEIGHT_ONLY_RECALL = 0.99
# Largest predictor, as a share of its layer's bundle bytes (it stays in DRAM).
DEFAULT_PREDICTOR_MAX_SHARE = 0.25
TENSOR_PRED_SIGMA_G = "blk.{bid}.pred_sigma_g"  # F32 [n_ff], version 2, optional
TENSOR_PRED_SIGMA_U = "blk.{bid}.pred_sigma_u"  # F32 [n_ff], with pred_b_up and pred_sigma_g
PREDICTOR_TENSOR_SUFFIXES = (".pred_a", ".pred_b", ".pred_b_up", ".pred_scale",
                             ".pred_sigma_g", ".pred_sigma_u")
