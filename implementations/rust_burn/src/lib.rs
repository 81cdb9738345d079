//! ResNet18 on MNIST in burn: the PyTorch page's model and recipe with burn's modules, autodiff and SGD, in Rust.
//!
//! A Python extension (PyO3): `implementations/rust_burn/trainer.py` hands it the contract's data, learning-rate table,
//! epoch batches and canonical weights; everything that trains runs here. burn 0.22 dispatches one tensor type to the
//! backend of its device: Flex on CPU, CUDA (CubeCL) behind the `cuda` feature; autodiff is a property of the device.
//! Sections, in the same order in every framework: model, state, train step, epoch, evaluation, canonical weights.

use std::collections::HashMap;

use burn::module::{Module, ModuleMapper, ModuleVisitor, Param, RunningState};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::loss::{CrossEntropyLoss, CrossEntropyLossConfig};
use burn::nn::pool::{AdaptiveAvgPool2d, AdaptiveAvgPool2dConfig, MaxPool2d, MaxPool2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::optim::momentum::MomentumConfig;
use burn::optim::{GradientsParams, ModuleOptimizer, SgdConfig};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Int, Tensor, TensorData};
use numpy::{
    PyArray1, PyArrayDyn, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2, PyReadonlyArrayDyn, PyUntypedArrayMethods,
};
use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

const BN_EPSILON: f64 = 1e-5;
const BN_MOMENTUM: f64 = 0.1; // PyTorch's convention: the weight of the new batch
const SGD_MOMENTUM: f64 = 0.9;
const STAGE_WIDTHS: [usize; 4] = [64, 128, 256, 512];
const NUM_CLASSES: usize = 10;
const BURN_VERSION: &str = "0.22.0"; // Cargo.toml's pin

// --- Model -----------------------------------------------------------------------------------------------------------
/// PyTorch's BatchNorm2d. Not burn's `nn::BatchNorm`: that averages the biased batch variance into `running_var`,
/// PyTorch the unbiased one (n / (n - 1)). The normalization itself is burn's fused `batch_norm_train` op, with its
/// backward; only the running-statistics update differs. Fields carry PyTorch's names: the canonical names are paths.
#[derive(Module, Debug)]
pub struct BatchNorm {
    weight: Param<Tensor<1>>,
    bias: Param<Tensor<1>>,
    running_mean: RunningState<Tensor<1>>,
    running_var: RunningState<Tensor<1>>,
}

impl BatchNorm {
    fn new(channels: usize, device: &Device) -> Self {
        Self {
            weight: Param::from_tensor(Tensor::ones([channels], device)),
            bias: Param::from_tensor(Tensor::zeros([channels], device)),
            running_mean: RunningState::new(Tensor::zeros([channels], device)),
            running_var: RunningState::new(Tensor::ones([channels], device)),
        }
    }

    /// Batch statistics on an autodiff device (training), running statistics elsewhere (`Module::valid`).
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        if !x.device().is_autodiff() {
            let (mean, var) = (self.running_mean.value(), self.running_var.value());
            return burn::tensor::module::batch_norm(x, self.weight.val(), self.bias.val(), mean, var, BN_EPSILON);
        }
        let [batch, _, height, width] = x.dims();
        let n = (batch * height * width) as f64;
        let out = burn::tensor::module::batch_norm_train(x, self.weight.val(), self.bias.val(), BN_EPSILON);
        let blend = |running: &RunningState<Tensor<1>>, batch_value: Tensor<1>| {
            let value = running.value_sync().mul_scalar(1.0 - BN_MOMENTUM).add(batch_value.mul_scalar(BN_MOMENTUM));
            running.update(value.detach());
        };
        blend(&self.running_mean, out.mean);
        blend(&self.running_var, out.variance.mul_scalar(n / (n - 1.0))); // burn's is biased
        out.output
    }
}

fn conv(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
    device: &Device,
) -> Conv2d {
    Conv2dConfig::new([in_channels, out_channels], [kernel, kernel])
        .with_stride([stride, stride])
        .with_padding(PaddingConfig2d::Explicit(padding, padding, padding, padding))
        .with_bias(false)
        .init(device)
}

#[derive(Module, Debug)]
pub struct BasicBlock {
    conv1: Conv2d,
    bn1: BatchNorm,
    conv2: Conv2d,
    bn2: BatchNorm,
    downsample: Option<(Conv2d, BatchNorm)>, // a tuple: its paths are PyTorch's "downsample.0", "downsample.1"
}

impl BasicBlock {
    fn new(in_channels: usize, out_channels: usize, stride: usize, device: &Device) -> Self {
        let downsample = (stride != 1 || in_channels != out_channels)
            .then(|| (conv(in_channels, out_channels, 1, stride, 0, device), BatchNorm::new(out_channels, device)));
        Self {
            conv1: conv(in_channels, out_channels, 3, stride, 1, device),
            bn1: BatchNorm::new(out_channels, device),
            conv2: conv(out_channels, out_channels, 3, 1, 1, device),
            bn2: BatchNorm::new(out_channels, device),
            downsample,
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let shortcut = match &self.downsample {
            Some((conv, bn)) => bn.forward(conv.forward(x.clone())),
            None => x.clone(),
        };
        let out = relu(self.bn1.forward(self.conv1.forward(x)));
        let out = self.bn2.forward(self.conv2.forward(out));
        relu(out + shortcut)
    }
}

#[derive(Module, Debug)]
pub struct ResNet18 {
    conv1: Conv2d,
    bn1: BatchNorm,
    maxpool: MaxPool2d,
    layer1: Vec<BasicBlock>,
    layer2: Vec<BasicBlock>,
    layer3: Vec<BasicBlock>,
    layer4: Vec<BasicBlock>,
    avgpool: AdaptiveAvgPool2d,
    fc: Linear,
}

impl ResNet18 {
    fn new(device: &Device) -> Self {
        let stage = |in_channels: usize, width: usize, stride: usize| {
            vec![BasicBlock::new(in_channels, width, stride, device), BasicBlock::new(width, width, 1, device)]
        };
        let [w1, w2, w3, w4] = STAGE_WIDTHS;
        Self {
            conv1: conv(1, w1, 7, 2, 3, device),
            bn1: BatchNorm::new(w1, device),
            // burn's max pooling pads with -inf, as nn.MaxPool2d does
            maxpool: MaxPool2dConfig::new([3, 3])
                .with_strides([2, 2])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(),
            layer1: stage(w1, w1, 1),
            layer2: stage(w1, w2, 2),
            layer3: stage(w2, w3, 2),
            layer4: stage(w3, w4, 2),
            avgpool: AdaptiveAvgPool2dConfig::new([1, 1]).init(),
            fc: LinearConfig::new(w4, NUM_CLASSES).init(device),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        // [B, 1, 28, 28] -> [B, 10]
        let mut x = self.maxpool.forward(relu(self.bn1.forward(self.conv1.forward(x))));
        for block in self.layer1.iter().chain(&self.layer2).chain(&self.layer3).chain(&self.layer4) {
            x = block.forward(x);
        }
        self.fc.forward(self.avgpool.forward(x).flatten(1, 3))
    }
}

/// The backends this build has, by the name the Python page passes: "cpu" (Flex, burn's own CPU backend), "cuda".
fn select_device(name: &str) -> PyResult<Device> {
    match name {
        "cpu" => Ok(Device::flex()),
        #[cfg(feature = "cuda")]
        "cuda" => Ok(Device::cuda(0)),
        _ => Err(PyValueError::new_err(format!(
            "--device {name}: this build of the burn extension has the backends {BACKENDS:?} \
             (rebuild with `--features cuda` for CUDA)"
        ))),
    }
}

const BACKENDS: &[&str] = &[
    "cpu",
    #[cfg(feature = "cuda")]
    "cuda",
];

// --- State -----------------------------------------------------------------------------------------------------------
/// Model, optimizer and device-resident data; the Python page's `BurnTrainer` drives it.
#[pyclass(module = "mnist_burn")]
pub struct Trainer {
    device: Device, // autodiff-enabled: training runs here; `Module::valid` gives the plain-device model for evaluation
    model: ResNet18,
    optimizer: ModuleOptimizer,
    step: usize,
    schedule: Vec<f32>, // the contract's learning-rate table, indexed by step
    loss: CrossEntropyLoss,
    train_images: Tensor<4>,
    train_labels: Tensor<1, Int>,
    test_images: Tensor<4>,
    test_labels: Tensor<1, Int>,
}

fn float_tensor<const D: usize>(array: &PyReadonlyArrayDyn<f32>, device: &Device) -> PyResult<Tensor<D>> {
    let data = TensorData::new(array.as_array().iter().copied().collect::<Vec<f32>>(), array.shape().to_vec());
    check_rank::<D>(array.shape())?;
    Ok(Tensor::from_data(data, device))
}

fn int_tensor<const D: usize>(values: Vec<i64>, shape: &[usize], device: &Device) -> PyResult<Tensor<D, Int>> {
    check_rank::<D>(shape)?;
    Ok(Tensor::from_data(TensorData::new(values, shape.to_vec()), device))
}

fn check_rank<const D: usize>(shape: &[usize]) -> PyResult<()> {
    match shape.len() == D {
        true => Ok(()),
        false => Err(PyValueError::new_err(format!("expected a {D}-dimensional array, got shape {shape:?}"))),
    }
}

fn labels(array: &PyReadonlyArray1<i32>) -> Vec<i64> {
    array.as_array().iter().map(|&label| label as i64).collect()
}

fn make_optimizer() -> ModuleOptimizer {
    // burn's momentum dampens the gradient by default (0.1); PyTorch's, the contract's, does not: buf = 0.9 buf + grad
    SgdConfig::new().with_momentum(Some(MomentumConfig::new().with_momentum(SGD_MOMENTUM).with_dampening(0.0))).init()
}

#[pymethods]
impl Trainer {
    #[new]
    fn new(
        train_images: PyReadonlyArrayDyn<f32>,
        train_labels: PyReadonlyArray1<i32>,
        test_images: PyReadonlyArrayDyn<f32>,
        test_labels: PyReadonlyArray1<i32>,
        schedule: PyReadonlyArray1<f32>,
        device: &str,
    ) -> PyResult<Self> {
        let device = select_device(device)?.autodiff();
        let data = device.clone().inner(); // data needs no gradients: it lives on the plain device
        Ok(Self {
            model: ResNet18::new(&device),
            optimizer: make_optimizer(),
            step: 0,
            schedule: schedule.as_array().to_vec(),
            loss: CrossEntropyLossConfig::new().init(&device),
            train_images: float_tensor(&train_images, &data)?,
            train_labels: int_tensor(labels(&train_labels), &[train_labels.len()], &data)?,
            test_images: float_tensor(&test_images, &data)?,
            test_labels: int_tensor(labels(&test_labels), &[test_labels.len()], &data)?,
            device,
        })
    }

    #[staticmethod]
    fn backends() -> Vec<&'static str> {
        BACKENDS.to_vec()
    }

    #[staticmethod]
    fn framework_version() -> &'static str {
        BURN_VERSION
    }

    fn learning_rate(&self, step: usize) -> f64 {
        self.schedule[step] as f64
    }
}

// --- Train step ------------------------------------------------------------------------------------------------------
impl Trainer {
    /// One SGD step on a batch already on the device; the loss stays there (no sync per step).
    fn device_train_step(&mut self, images: Tensor<4>, labels: Tensor<1, Int>) -> Tensor<1> {
        let learning_rate = self.learning_rate(self.step);
        let loss = self.loss.forward(self.model.forward(images.autodiff()), labels.autodiff());
        let grads = GradientsParams::from_grads(loss.backward(), &self.model);
        self.model = self.optimizer.step(learning_rate, self.model.clone(), grads);
        self.step += 1;
        loss.inner()
    }
}

#[pymethods]
impl Trainer {
    fn train_step(&mut self, images: PyReadonlyArrayDyn<f32>, labels: PyReadonlyArray1<i32>) -> PyResult<f32> {
        let data = self.device.clone().inner();
        let images = float_tensor(&images, &data)?;
        let labels = int_tensor(self::labels(&labels), &[labels.len()], &data)?;
        Ok(self.device_train_step(images, labels).into_scalar())
    }
}

// --- Epoch -----------------------------------------------------------------------------------------------------------
#[pymethods]
impl Trainer {
    /// Trains on `batches` ([steps, batch] indices from the contract), without the GIL; returns the mean loss and the
    /// labels the steps consumed, in order (read back after the loss: the epoch is done on the device).
    fn train_epoch<'py>(
        &mut self,
        py: Python<'py>,
        batches: PyReadonlyArray2<i64>,
    ) -> PyResult<(f32, Bound<'py, PyArray1<i64>>)> {
        let [steps, batch] = [batches.shape()[0], batches.shape()[1]];
        let batches = int_tensor::<2>(
            batches.as_array().iter().copied().collect(),
            &[steps, batch],
            &self.device.clone().inner(),
        )?;
        let (mean_loss, consumed) = py.detach(|| {
            let (mut losses, mut consumed) = (Vec::with_capacity(steps), Vec::with_capacity(steps));
            for step in 0..steps {
                let indices = batches.clone().slice(step..step + 1).reshape([batch]);
                let labels = self.train_labels.clone().select(0, indices.clone());
                losses.push(self.device_train_step(self.train_images.clone().select(0, indices), labels.clone()));
                consumed.push(labels);
            }
            let mean_loss: f32 = Tensor::cat(losses, 0).mean().into_scalar();
            (mean_loss, Tensor::cat(consumed, 0).into_data().convert::<i64>().try_into_vec::<i64>().unwrap())
        });
        Ok((mean_loss, PyArray1::from_vec(py, consumed)))
    }
}

// --- Evaluation ------------------------------------------------------------------------------------------------------
impl Trainer {
    /// (summed loss, correct count) of one evaluation batch, on the device.
    fn device_eval_step(
        &self,
        model: &ResNet18,
        images: Tensor<4>,
        labels: Tensor<1, Int>,
    ) -> (Tensor<1>, Tensor<1, Int>) {
        let logits = model.forward(images);
        let [batch, _] = logits.dims();
        let correct = logits.clone().argmax(1).reshape([batch]).equal(labels.clone()).int().sum();
        (self.loss.forward(logits, labels).mul_scalar(batch as f64), correct)
    }
}

#[pymethods]
impl Trainer {
    /// (summed loss, correct count) over the test images, `eval_batch` at a time, with the running statistics.
    fn evaluate(&self, py: Python<'_>, eval_batch: usize) -> (f64, i64) {
        py.detach(|| {
            let model = self.model.valid();
            let total = self.test_labels.dims()[0];
            let (mut loss_sum, mut correct) = (Vec::new(), Vec::new());
            for start in (0..total).step_by(eval_batch) {
                let end = (start + eval_batch).min(total);
                let images = self.test_images.clone().slice(start..end);
                let (loss, hits) = self.device_eval_step(&model, images, self.test_labels.clone().slice(start..end));
                loss_sum.push(loss);
                correct.push(hits);
            }
            let loss_sum: f32 = Tensor::cat(loss_sum, 0).sum().into_scalar();
            let correct: i64 = Tensor::cat(correct, 0).sum().into_scalar();
            (loss_sum as f64, correct)
        })
    }

    /// [B, 10] logits of a host batch; `train`: with batch statistics, which also updates the running ones.
    fn logits<'py>(
        &self,
        py: Python<'py>,
        images: PyReadonlyArrayDyn<f32>,
        train: bool,
    ) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
        let logits = match train {
            true => self.model.forward(float_tensor(&images, &self.device)?),
            false => self.model.valid().forward(float_tensor(&images, &self.device.clone().inner())?),
        };
        to_numpy(py, logits.into_data())
    }
}

// --- Canonical weights -----------------------------------------------------------------------------------------------
// The module paths are PyTorch's state_dict names (the field names are chosen so); only the linear weight's layout
// differs: burn keeps it [in, out], PyTorch [out, in].
struct ImportCanonical<'a> {
    weights: &'a HashMap<String, TensorData>,
    path: Vec<String>,
    missing: Vec<String>,
}

impl ModuleMapper for ImportCanonical<'_> {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let name = self.path.join(".");
        let Some(data) = self.weights.get(&name) else {
            self.missing.push(name);
            return param;
        };
        let tensor = Tensor::<D>::from_data(data.clone(), &param.lazy_device());
        let tensor = if name == "fc.weight" { tensor.transpose() } else { tensor };
        param.map(|old| tensor.set_require_grad(old.is_require_grad()))
    }
}

struct ExportCanonical {
    path: Vec<String>,
    weights: Vec<(String, TensorData)>,
}

impl ModuleVisitor for ExportCanonical {
    fn enter_module(&mut self, name: &str, _container_type: &str) {
        self.path.push(name.to_string());
    }

    fn exit_module(&mut self, _name: &str, _container_type: &str) {
        self.path.pop();
    }

    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        let name = self.path.join(".");
        let tensor = if name == "fc.weight" { param.val().transpose() } else { param.val() };
        self.weights.push((name, tensor.into_data()));
    }
}

fn import_canonical(model: ResNet18, weights: &HashMap<String, TensorData>) -> Result<ResNet18, String> {
    let mut import = ImportCanonical { weights, path: Vec::new(), missing: Vec::new() };
    let model = model.map(&mut import);
    match import.missing.is_empty() {
        true => Ok(model),
        false => Err(format!("canonical weights lack {:?}", import.missing)),
    }
}

fn export_canonical(model: &ResNet18) -> Vec<(String, TensorData)> {
    let mut export = ExportCanonical { path: Vec::new(), weights: Vec::new() };
    model.valid().visit(&mut export); // `valid` folds in the running statistics' pending updates
    export.weights
}

fn to_numpy<'py>(py: Python<'py>, data: TensorData) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let shape = data.shape().to_vec();
    PyArray1::from_vec(py, data.convert::<f32>().try_into_vec::<f32>().unwrap()).reshape(shape)
}

#[pymethods]
impl Trainer {
    /// Start afresh from canonical weights (checked by the Python page): model, BatchNorm statistics, optimizer, step 0
    fn import_weights(&mut self, weights: HashMap<String, PyReadonlyArrayDyn<f32>>) -> PyResult<()> {
        let weights = weights
            .into_iter()
            .map(|(name, array)| {
                let data =
                    TensorData::new(array.as_array().iter().copied().collect::<Vec<f32>>(), array.shape().to_vec());
                (name, data)
            })
            .collect();
        self.model = import_canonical(ResNet18::new(&self.device), &weights).map_err(PyValueError::new_err)?;
        self.optimizer = make_optimizer();
        self.step = 0;
        Ok(())
    }

    fn export_weights<'py>(&self, py: Python<'py>) -> PyResult<HashMap<String, Bound<'py, PyArrayDyn<f32>>>> {
        export_canonical(&self.model).into_iter().map(|(name, data)| Ok((name, to_numpy(py, data)?))).collect()
    }
}

#[pymodule]
fn mnist_burn(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_class::<Trainer>()
}
