"""TensorRT's ONNX operator support, encoded from docs/architecture.md ("TensorRT's ONNX
operator support": onnx-tensorrt's support matrix, TensorRT 8.5 edition, plus later additions).
Data only."""
from __future__ import annotations

# Accepted by TensorRT 8.5+.
ACCEPTED = frozenset("""
Abs Acos Acosh Add And ArgMax ArgMin Asin Asinh Atan Atanh AveragePool BatchNormalization Cast
Ceil Celu Clip Concat Constant ConstantOfShape Conv ConvTranspose Cos Cosh CumSum DepthToSpace
DequantizeLinear Div Dropout Einsum Elu Equal Erf Exp Expand EyeLike Flatten Floor Gather
GatherElements GatherND Gemm GlobalAveragePool GlobalLpPool GlobalMaxPool Greater GreaterOrEqual
GridSample GRU HardSwish HardSigmoid Identity If ImageScaler InstanceNormalization IsNaN
LeakyRelu Less LessOrEqual Log LogSoftmax Loop LRN LSTM LpNormalization LpPool MatMul Max MaxPool
Mean MeanVarianceNormalization Min Mod Mul Neg NonMaxSuppression NonZero Not OneHot Or Pad
ParametricSoftplus Pow PRelu QuantizeLinear RandomNormal RandomNormalLike RandomUniform
RandomUniformLike Range Reciprocal ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax
ReduceMean ReduceMin ReduceProd ReduceSum ReduceSumSquare Relu Reshape Resize ReverseSequence RNN
RoiAlign Round ScaledTanh Scan Scatter ScatterElements ScatterND Selu Shape Shrink Sigmoid Sign
Sin Sinh Size Slice Softmax Softplus Softsign SpaceToDepth Split Sqrt Squeeze Sub Sum Tan Tanh
ThresholdedRelu Tile TopK Transpose Trilu Unsqueeze Upsample Where Xor
""".split())

# Added later: op -> (minimum TensorRT version, minimum opset, note).
ADDED_LATER = {
    "LayerNormalization": ((8, 6), 17, "native normalization layer, preferred in FP16"),
    "GroupNormalization": ((10, 0), 18, ""),
    "Attention": ((10, 14), 23, ""),
}

# Explicitly rejected (a clearer message than "not in the accepted list").
REJECTED = frozenset("""
Bernoulli BitShift BlackmanWindow Compress ConcatFromSequence ConvInteger DFT Det
DynamicQuantizeLinear HammingWindow HannWindow Hardmax IsInf MatMulInteger MaxRoiPool MaxUnpool
MelWeightMatrix Multinomial NegativeLogLikelihoodLoss Optional OptionalGetElement
OptionalHasElement QLinearConv QLinearMatMul SequenceAt SequenceConstruct SequenceEmpty
SequenceErase SequenceInsert SequenceLength SequenceMap SoftmaxCrossEntropyLoss SplitToSequence
STFT StringNormalizer TfIdfVectorizer Unique
""".split())

# Inputs TensorRT needs as initializers (constants): op -> (input index, what it is).
NEEDS_INITIALIZER = {
    "Conv": ((1, "weights"), (2, "bias")),
    "ConvTranspose": ((1, "weights"), (2, "bias")),
    "InstanceNormalization": ((1, "scale"), (2, "bias")),
    "Slice": ((3, "axes"),),
    "Squeeze": ((1, "axes"),),
    "TopK": ((1, "K"),),
    "CumSum": ((1, "axis"),),
}

RESIZE_MODES = frozenset({"nearest", "linear"})

# TensorRT ignores these ops' seeds: a graph must export a distribution's mean, not a sample.
RANDOM_OPS = frozenset({"RandomNormal", "RandomNormalLike", "RandomUniform",
                        "RandomUniformLike", "Bernoulli", "Multinomial"})

# The TensorRT version assumed when none is importable: the oldest the `trt` extra accepts
# (strongly typed builds; export/trt.py MIN_VERSION).
DEFAULT_TRT_VERSION = (10, 12)
