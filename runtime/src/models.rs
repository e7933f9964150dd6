//! The reference's models, built with [`ModelBuilder`]: LeNet-300-100 and LeNet-5 (MNIST),
//! VGG16-D and the wide residual networks (CIFAR-10, or MNIST padded to 32×32).
//!
//! Layer names are the PyTorch `state_dict` prefixes of the reference's models
//! (`features.0`, `block1.layer.0.conv1`, `bn1`, …), so checkpoint tensors load there.

use std::fmt;
use std::str::FromStr;

use crate::layers::Shape;
use crate::model::ModelBuilder;

/// A model the trainer knows by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModelKind {
    /// LeNet-300-100: fc1 784→300, ReLU; fc2 300→100, ReLU; fc3 100→10.
    Lenet300100,
    /// LeNet-5, Caffe variant: conv1 1→20 5×5, ReLU, max-pool 2; conv2 20→50 5×5, ReLU,
    /// max-pool 2; fc3 800→500, ReLU; fc4 500→10.
    Lenet5,
    /// VGG16-D with batch normalisation and a 512–512 classifier ([`vgg_d`]).
    VggD,
    /// WRN-16-2, a small wide residual network for quick runs ([`wide_resnet`]).
    Wrn16x2,
    /// WRN-16-8.
    Wrn16x8,
    /// WRN-16-10.
    Wrn16x10,
    /// WRN-28-2.
    Wrn28x2,
}

/// Every model the trainer knows, in the order `--help` lists them.
pub const MODEL_NAMES: &str =
    "lenet300-100, lenet5, vgg-d, wrn-16-2, wrn-16-8, wrn-16-10 or wrn-28-2";

impl ModelKind {
    /// The command-line name: `lenet300-100`, `lenet5`, `vgg-d`, `wrn-16-8`, ….
    pub fn name(self) -> &'static str {
        match self {
            ModelKind::Lenet300100 => "lenet300-100",
            ModelKind::Lenet5 => "lenet5",
            ModelKind::VggD => "vgg-d",
            ModelKind::Wrn16x2 => "wrn-16-2",
            ModelKind::Wrn16x8 => "wrn-16-8",
            ModelKind::Wrn16x10 => "wrn-16-10",
            ModelKind::Wrn28x2 => "wrn-28-2",
        }
    }

    /// The model's description for an input of `input` and `classes` classes.
    pub fn builder(self, input: Shape, classes: usize) -> ModelBuilder {
        match self {
            ModelKind::Lenet300100 => lenet300_100(input, classes),
            ModelKind::Lenet5 => lenet5(input, classes),
            ModelKind::VggD => vgg_d(input, classes),
            ModelKind::Wrn16x2 => wide_resnet(input, classes, 16, 2),
            ModelKind::Wrn16x8 => wide_resnet(input, classes, 16, 8),
            ModelKind::Wrn16x10 => wide_resnet(input, classes, 16, 10),
            ModelKind::Wrn28x2 => wide_resnet(input, classes, 28, 2),
        }
    }
}

impl fmt::Display for ModelKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for ModelKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "lenet300-100" | "lenet300_100" | "lenet-300-100" => Ok(ModelKind::Lenet300100),
            "lenet5" | "lenet-5" => Ok(ModelKind::Lenet5),
            "vgg-d" | "vgg16-d" | "vgg16" => Ok(ModelKind::VggD),
            "wrn-16-2" => Ok(ModelKind::Wrn16x2),
            "wrn-16-8" => Ok(ModelKind::Wrn16x8),
            "wrn-16-10" => Ok(ModelKind::Wrn16x10),
            "wrn-28-2" => Ok(ModelKind::Wrn28x2),
            _ => Err(format!("unknown model {s:?} (expected {MODEL_NAMES})")),
        }
    }
}

/// LeNet-300-100 (layers `fc1`, `fc2`, `fc3`).
pub fn lenet300_100(input: Shape, classes: usize) -> ModelBuilder {
    ModelBuilder::new("lenet300-100", input)
        .linear("fc1", 300)
        .relu()
        .linear("fc2", 100)
        .relu()
        .linear("fc3", classes)
}

/// LeNet-5, Caffe variant (layers `conv1`, `conv2`, `fc3`, `fc4`), for `1 × 28 × 28` inputs.
pub fn lenet5(input: Shape, classes: usize) -> ModelBuilder {
    ModelBuilder::new("lenet5", input)
        .conv2d("conv1", 20, 5)
        .relu()
        .max_pool(2)
        .conv2d("conv2", 50, 5)
        .relu()
        .max_pool(2)
        .linear("fc3", 500)
        .relu()
        .linear("fc4", classes)
}

/// The extra zero padding of a first 3×3 convolution that brings a square input smaller than
/// 32×32 (MNIST's 28×28) to a 32×32 output, as padding the image to 32×32 would (VGG-D's
/// five poolings and WRN's 8×8 pooling need it); 0 for 32×32 and larger.
fn pad_to_32(input: Shape) -> usize {
    if input.height == input.width && input.height < 32 && (32 - input.height).is_multiple_of(2) {
        (32 - input.height) / 2
    } else {
        0
    }
}

/// VGG16-D as the reference defines it: thirteen 3×3 convolutions (64, 64, M, 128, 128, M,
/// 256×3, M, 512×3, M, 512×3, M; M a 2×2 max-pool), each followed by batch normalisation and
/// ReLU, then the classifier Linear(512, 512), ReLU, BatchNorm1d, Linear(512, 512), ReLU,
/// BatchNorm1d, Linear(512, classes). Layer names are the reference's `features.N` and
/// `classifier.N`.
pub fn vgg_d(input: Shape, classes: usize) -> ModelBuilder {
    const CONFIG: [usize; 18] = [
        64, 64, 0, 128, 128, 0, 256, 256, 256, 0, 512, 512, 512, 0, 512, 512, 512, 0,
    ];
    let mut b = ModelBuilder::new("vgg-d", input);
    let mut index = 0;
    for (i, &v) in CONFIG.iter().enumerate() {
        if v == 0 {
            b = b.max_pool(2);
            index += 1;
        } else {
            let padding = 1 + if i == 0 { pad_to_32(input) } else { 0 };
            b = b
                .conv2d_with(&format!("features.{index}"), v, 3, 1, padding)
                .batch_norm(&format!("features.{}", index + 1))
                .relu();
            index += 3;
        }
    }
    b.linear("classifier.0", 512)
        .relu()
        .batch_norm("classifier.2")
        .linear("classifier.3", 512)
        .relu()
        .batch_norm("classifier.5")
        .linear("classifier.6", classes)
}

/// The reference's wide residual network WRN-`depth`-`widen`: conv1 (3×3 to 16 channels),
/// three groups of `(depth − 4)/6` pre-activation blocks (16·widen, 32·widen and 64·widen
/// channels; the second and third start with stride 2), then batch norm, ReLU, global
/// average pooling and the linear classifier. A block is BN-ReLU-conv3×3-BN-ReLU-dropout
/// (0.3)-conv3×3 plus the shortcut: the block's input, or a 1×1 convolution of its
/// activated input where the channels or the stride change. Convolutions have no bias.
pub fn wide_resnet(input: Shape, classes: usize, depth: usize, widen: usize) -> ModelBuilder {
    const DROPOUT: f32 = 0.3;
    let n = (depth - 4) / 6;
    let widths = [16, 16 * widen, 32 * widen, 64 * widen];
    let mut b = ModelBuilder::new(&format!("wrn-{depth}-{widen}"), input).conv2d_without_bias(
        "conv1",
        widths[0],
        3,
        1,
        1 + pad_to_32(input),
    );
    for group in 0..3 {
        for i in 0..n {
            let (c_in, c_out) = (
                if i == 0 {
                    widths[group]
                } else {
                    widths[group + 1]
                },
                widths[group + 1],
            );
            let stride = if i == 0 && group > 0 { 2 } else { 1 };
            let p = format!("block{}.layer.{i}", group + 1);
            let equal = c_in == c_out && stride == 1;
            let x = b.tap();
            b = b.batch_norm(&format!("{p}.bn1")).relu();
            // With a shortcut convolution, the shortcut reads the activated input.
            let activated = b.tap();
            b = b
                .conv2d_without_bias(&format!("{p}.conv1"), c_out, 3, stride, 1)
                .batch_norm(&format!("{p}.bn2"))
                .relu()
                .dropout(&format!("{p}.dropout"), DROPOUT)
                .conv2d_without_bias(&format!("{p}.conv2"), c_out, 3, 1, 1);
            if equal {
                b = b.add_residual(x);
            } else {
                let main = b.tap();
                b = b
                    .from(activated)
                    .conv2d_without_bias(&format!("{p}.convShortcut"), c_out, 1, stride, 0)
                    .add_residual(main);
            }
        }
    }
    b.batch_norm("bn1")
        .relu()
        .global_avg_pool()
        .linear("fc", classes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn build(kind: ModelKind, input: Shape) -> crate::Model {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        kind.builder(input, 10).build(2, &mut rng).unwrap()
    }

    fn masked(model: &crate::Model) -> usize {
        model.sparse_layers().map(|w| w.rows() * w.cols()).sum()
    }

    #[test]
    fn wide_resnets_have_the_reference_shapes_and_names() {
        let cifar = Shape::image(3, 32, 32);
        // WRN-16-8: 10.95 M masked weights (every conv and the classifier), counted by hand.
        let m = build(ModelKind::Wrn16x8, cifar);
        assert_eq!(masked(&m), 10_949_040 + 5_120);
        let names: Vec<&str> = m.sparse_layers().map(|w| w.name()).collect();
        assert_eq!(names.len(), 1 + 3 * (2 * 2 + 1) + 1);
        assert_eq!(
            names[..5],
            [
                "conv1",
                "block1.layer.0.conv1",
                "block1.layer.0.conv2",
                "block1.layer.0.convShortcut",
                "block1.layer.1.conv1"
            ]
        );
        assert_eq!(names.last(), Some(&"fc"));
        assert!(m
            .sparse_layers()
            .filter(|w| w.name() != "fc")
            .all(|w| !w.has_bias()));
        let bn: Vec<&str> = m.dense_params().map(|p| p.name.as_str()).collect();
        assert_eq!(
            bn[..2],
            ["block1.layer.0.bn1.weight", "block1.layer.0.bn1.bias"]
        );
        assert_eq!(bn.last(), Some(&"bn1.bias"));
        assert_eq!(m.classes(), 10);
        // WRN-28-2 has four blocks per group; on MNIST the first conv pads to 32×32.
        let m = build(ModelKind::Wrn28x2, Shape::image(1, 28, 28));
        assert_eq!(m.sparse_layers().count(), 1 + 3 * 4 * 2 + 3 + 1);
        let fc = m.sparse_layers().last().unwrap();
        assert_eq!(fc.cols(), 128);
    }

    #[test]
    fn vgg_d_has_the_reference_shapes_and_names() {
        let m = build(ModelKind::VggD, Shape::image(3, 32, 32));
        let names: Vec<&str> = m.sparse_layers().map(|w| w.name()).collect();
        assert_eq!(names.len(), 13 + 3);
        assert_eq!(names[..3], ["features.0", "features.3", "features.7"]);
        assert_eq!(
            names[12..],
            [
                "features.40",
                "classifier.0",
                "classifier.3",
                "classifier.6"
            ]
        );
        // 14.7 M convolution weights and 0.53 M classifier weights.
        assert_eq!(masked(&m), 14_710_464 + 512 * 512 * 2 + 5_120);
        let bn: Vec<&str> = m.stats().map(|b| b.name.as_str()).collect();
        assert_eq!(
            bn[..2],
            ["features.1.running_mean", "features.1.running_var"]
        );
        assert_eq!(bn.last(), Some(&"classifier.5.running_var"));
        // MNIST is padded to 32×32: five poolings leave 1×1.
        let m = build(ModelKind::VggD, Shape::image(1, 28, 28));
        assert_eq!(m.sparse_layers().nth(13).unwrap().cols(), 512);
    }
}
