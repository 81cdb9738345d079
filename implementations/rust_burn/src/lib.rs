//! ResNet18 on MNIST in burn: the PyTorch page's model and recipe with burn's modules, autodiff and SGD, in Rust.
//!
//! A Python extension (PyO3): `implementations/rust_burn/trainer.py` hands it the contract's recipe, data,
//! learning-rate table, epoch batches and canonical weights; everything that trains runs here. burn 0.22 dispatches one
//! tensor type to the backend of its device: Flex on CPU, CUDA (CubeCL) behind the `cuda` feature; autodiff is a
//! property of the device. Every input is checked where it enters, so that a bad one is a Python exception naming it,
//! never a panic inside burn. Sections, in the same order in every framework: model, state, train step, epoch,
//! evaluation, canonical weights.

use std::collections::HashMap;
use std::fmt::Display;
use std::num::NonZeroUsize;

use burn::module::{Module, ModuleVisitor, Param, RunningState};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::loss::{CrossEntropyLoss, CrossEntropyLossConfig};
use burn::nn::pool::{AdaptiveAvgPool2d, AdaptiveAvgPool2dConfig, MaxPool2d, MaxPool2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d};
use burn::optim::momentum::MomentumConfig;
use burn::optim::{GradientsParams, ModuleOptimizer, SgdConfig};
use burn::store::{BurnToPyTorchAdapter, ModuleSnapshot, PyTorchToBurnAdapter, bridge};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Int, Tensor, TensorData};
use numpy::{
    PyArray1, PyArrayDyn, PyArrayMethods, PyReadonlyArray1, PyReadonlyArray2, PyReadonlyArrayDyn, PyUntypedArrayMethods,
};
use pyo3::exceptions::{PyRuntimeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::PyCFunction;

const BURN_VERSION: &str = "0.22.0"; // Cargo.toml's pin

/// `contract.recipe()`, which the Python page passes: nothing of it is restated here.
#[derive(FromPyObject, Debug, Clone, Copy)]
#[pyo3(from_item_all)]
struct Recipe {
    bn_epsilon: f64,
    bn_momentum: f64, // PyTorch's convention: the weight of the new batch
    sgd_momentum: f64,
    stage_widths: [usize; 4],
    num_classes: usize,
}

impl Recipe {
    /// What burn's own layers assert (`BatchNormConfig::init`), as a Python exception.
    fn check(self) -> PyResult<Self> {
        let fraction = 0.0..=1.0;
        match self.bn_epsilon > 0.0
            && fraction.contains(&self.bn_momentum)
            && fraction.contains(&self.sgd_momentum)
            && self.stage_widths.iter().all(|&width| width > 0)
            && self.num_classes > 0
        {
            true => Ok(self),
            false => Err(PyValueError::new_err(format!(
                "recipe {self:?}: expected a positive epsilon, momenta from 0 to 1, positive widths and classes"
            ))),
        }
    }
}

// --- Model -----------------------------------------------------------------------------------------------------------
/// PyTorch's BatchNorm2d, with burn's `nn::BatchNorm` names (gamma, beta). Not burn's module itself: that averages the
/// biased batch variance into `running_var`, PyTorch the unbiased one (n / (n - 1)). The normalization is burn's fused
/// `batch_norm_train` op, with its backward; only the running-statistics update differs.
#[derive(Module, Debug)]
pub struct BatchNorm {
    gamma: Param<Tensor<1>>,
    beta: Param<Tensor<1>>,
    running_mean: RunningState<Tensor<1>>,
    running_var: RunningState<Tensor<1>>,
    momentum: f64,
    epsilon: f64,
}

impl BatchNorm {
    fn new(channels: usize, recipe: &Recipe, device: &Device) -> Self {
        Self {
            gamma: Param::from_tensor(Tensor::ones([channels], device)),
            beta: Param::from_tensor(Tensor::zeros([channels], device)),
            running_mean: RunningState::new(Tensor::zeros([channels], device)),
            running_var: RunningState::new(Tensor::ones([channels], device)),
            momentum: recipe.bn_momentum,
            epsilon: recipe.bn_epsilon,
        }
    }

    /// Batch statistics on an autodiff device (training), running statistics elsewhere (`Module::valid`).
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        if !x.device().is_autodiff() {
            let (mean, var) = (self.running_mean.value(), self.running_var.value());
            return burn::tensor::module::batch_norm(x, self.gamma.val(), self.beta.val(), mean, var, self.epsilon);
        }
        let [batch, _, height, width] = x.dims();
        let n = (batch * height * width) as f64;
        let out = burn::tensor::module::batch_norm_train(x, self.gamma.val(), self.beta.val(), self.epsilon);
        let blend = |running: &RunningState<Tensor<1>>, batch_value: Tensor<1>| {
            let value = running.value_sync().mul_scalar(1.0 - self.momentum).add(batch_value.mul_scalar(self.momentum));
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
    fn new(in_channels: usize, out_channels: usize, stride: usize, recipe: &Recipe, device: &Device) -> Self {
        let bn = |channels| BatchNorm::new(channels, recipe, device);
        let downsample = (stride != 1 || in_channels != out_channels)
            .then(|| (conv(in_channels, out_channels, 1, stride, 0, device), bn(out_channels)));
        Self {
            conv1: conv(in_channels, out_channels, 3, stride, 1, device),
            bn1: bn(out_channels),
            conv2: conv(out_channels, out_channels, 3, 1, 1, device),
            bn2: bn(out_channels),
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
    fn new(recipe: &Recipe, device: &Device) -> Self {
        let stage = |in_channels: usize, width: usize, stride: usize| {
            let block = |in_channels, stride| BasicBlock::new(in_channels, width, stride, recipe, device);
            vec![block(in_channels, stride), block(width, 1)]
        };
        let [w1, w2, w3, w4] = recipe.stage_widths;
        Self {
            conv1: conv(1, w1, 7, 2, 3, device),
            bn1: BatchNorm::new(w1, recipe, device),
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
            fc: LinearConfig::new(w4, recipe.num_classes).init(device),
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

// --- State -----------------------------------------------------------------------------------------------------------
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

/// Model, optimizer and device-resident data; the Python page's `BurnTrainer` drives it.
#[pyclass(module = "mnist_burn")]
pub struct Trainer {
    device: Device, // autodiff-enabled: training runs here; `Module::valid` gives the plain-device model for evaluation
    recipe: Recipe,
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

/// `array` as images on `device`, if it holds at least one and each has the shape `image` ([1, 28, 28]).
fn images_tensor(array: &PyReadonlyArrayDyn<f32>, image: [usize; 3], device: &Device) -> PyResult<Tensor<4>> {
    let [channels, height, width] = image;
    match array.shape() {
        &[count, ref rest @ ..] if count > 0 && rest == image => {
            let values = array.as_array().iter().copied().collect::<Vec<f32>>();
            Ok(Tensor::from_data(TensorData::new(values, [count, channels, height, width]), device))
        }
        shape => Err(PyValueError::new_err(format!(
            "images of shape {shape:?}: expected [batch, {channels}, {height}, {width}]"
        ))),
    }
}

/// `array` as labels on `device`, if it holds one class index per image.
fn labels_tensor(
    array: &PyReadonlyArray1<i32>,
    count: usize,
    classes: usize,
    device: &Device,
) -> PyResult<Tensor<1, Int>> {
    let values: Vec<i64> = array.as_array().iter().map(|&label| label as i64).collect();
    if values.len() != count {
        return Err(PyValueError::new_err(format!("{} labels for {count} images", values.len())));
    }
    if let Some(label) = values.iter().find(|label| !(0..classes as i64).contains(label)) {
        return Err(PyValueError::new_err(format!("label {label}: expected a class index from 0 to {}", classes - 1)));
    }
    Ok(Tensor::from_data(TensorData::new(values, [count]), device))
}

/// A read back from the device (or a sync) that failed, as CUDA reports an earlier kernel's error: a Python exception.
fn runtime_error(error: impl Display) -> PyErr {
    PyRuntimeError::new_err(error.to_string())
}

fn make_optimizer(recipe: &Recipe) -> ModuleOptimizer {
    // burn's momentum dampens the gradient by default (0.1); PyTorch's, the contract's, does not: buf = m buf + grad
    let momentum = MomentumConfig::new().with_momentum(recipe.sgd_momentum).with_dampening(0.0);
    SgdConfig::new().with_momentum(Some(momentum)).init()
}

/// burn's `Module::num_params` counts the running statistics too: this counts what requires a gradient.
struct TrainableParameters(usize);

impl ModuleVisitor for TrainableParameters {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
        if param.is_require_grad() {
            self.0 += param.lazy_shape().num_elements();
        }
    }
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
        recipe: Recipe,
    ) -> PyResult<Self> {
        let recipe = recipe.check()?;
        let device = select_device(device)?.autodiff();
        let data = device.clone().inner(); // data needs no gradients: it lives on the plain device
        let &[_, 1, height, width] = train_images.shape() else {
            let shape = train_images.shape();
            return Err(PyValueError::new_err(format!("training images of shape {shape:?}: expected [N, 1, H, W]")));
        };
        let image = [1, height, width]; // the stem takes one channel
        let (train_images, test_images) =
            (images_tensor(&train_images, image, &data)?, images_tensor(&test_images, image, &data)?);
        let classes = recipe.num_classes;
        Ok(Self {
            model: ResNet18::new(&recipe, &device),
            optimizer: make_optimizer(&recipe),
            step: 0,
            schedule: schedule.as_array().to_vec(),
            loss: CrossEntropyLossConfig::new().init(&device),
            train_labels: labels_tensor(&train_labels, train_images.dims()[0], classes, &data)?,
            test_labels: labels_tensor(&test_labels, test_images.dims()[0], classes, &data)?,
            train_images,
            test_images,
            device,
            recipe,
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

    fn trainable_parameters(&self) -> usize {
        let mut count = TrainableParameters(0);
        self.model.visit(&mut count);
        count.0
    }
}

impl Trainer {
    fn image(&self) -> [usize; 3] {
        let [_, channels, height, width] = self.train_images.dims();
        [channels, height, width]
    }
}

// --- Train step ------------------------------------------------------------------------------------------------------
impl Trainer {
    /// One SGD step on a batch already on the device; the loss stays there (no sync per step).
    fn train_step(&mut self, images: Tensor<4>, labels: Tensor<1, Int>) -> PyResult<Tensor<1>> {
        let learning_rate = self.learning_rate(self.step)?;
        let loss = self.loss.forward(self.model.forward(images.autodiff()), labels.autodiff());
        let grads = GradientsParams::from_grads(loss.backward(), &self.model);
        self.model = self.optimizer.step(learning_rate, self.model.clone(), grads);
        self.step += 1;
        Ok(loss.inner())
    }

    fn learning_rate(&self, step: usize) -> PyResult<f64> {
        match self.schedule.get(step) {
            Some(&rate) => Ok(rate as f64),
            None => Err(PyValueError::new_err(format!("step {step}: the schedule has {} steps", self.schedule.len()))),
        }
    }
}

#[pymethods]
impl Trainer {
    fn train_on_batch(&mut self, images: PyReadonlyArrayDyn<f32>, labels: PyReadonlyArray1<i32>) -> PyResult<f32> {
        let data = self.device.clone().inner();
        let images = images_tensor(&images, self.image(), &data)?;
        let labels = labels_tensor(&labels, images.dims()[0], self.recipe.num_classes, &data)?;
        self.train_step(images, labels)?.try_into_scalar().map_err(runtime_error)
    }

    fn learning_rates(&self, steps: Vec<usize>) -> PyResult<Vec<f64>> {
        steps.into_iter().map(|step| self.learning_rate(step)).collect()
    }
}

// --- Epoch -----------------------------------------------------------------------------------------------------------
#[pymethods]
impl Trainer {
    /// Trains on `batches` ([steps, batch] indices into the training images) without the GIL, calling
    /// `progress(steps_done, wait)` after each step (`wait` syncs the device); returns the mean loss and the labels the
    /// steps consumed, in order (read back after the loss: the steps are done on the device).
    fn train_batches<'py>(
        &mut self,
        py: Python<'py>,
        batches: PyReadonlyArray2<i64>,
        progress: Py<PyAny>,
    ) -> PyResult<(f32, Bound<'py, PyArray1<i64>>)> {
        let (shape, train_images) = (batches.shape(), self.train_images.dims()[0] as i64);
        let [steps, batch] = [shape[0], shape[1]];
        if steps == 0 || batch == 0 || batches.as_array().iter().any(|index| !(0..train_images).contains(index)) {
            return Err(PyValueError::new_err(format!(
                "batches of shape {shape:?}: expected [steps, batch] indices from 0 to {}",
                train_images - 1
            )));
        }
        let indices = TensorData::new(batches.as_array().iter().copied().collect::<Vec<i64>>(), [steps, batch]);
        let batches = Tensor::<2, Int>::from_data(indices, &self.device.clone().inner());
        let device = self.device.clone();
        let wait = PyCFunction::new_closure(py, None, None, move |args, _| {
            args.py().detach(|| device.sync()).map_err(runtime_error)
        })?
        .unbind();
        let (mean_loss, consumed) = py.detach(|| -> PyResult<_> {
            let (mut losses, mut consumed) = (Vec::with_capacity(steps), Vec::with_capacity(steps));
            for step in 0..steps {
                let indices = batches.clone().slice(step..step + 1).reshape([batch]);
                let labels = self.train_labels.clone().select(0, indices.clone());
                losses.push(self.train_step(self.train_images.clone().select(0, indices), labels.clone())?);
                consumed.push(labels);
                Python::attach(|py| progress.call1(py, (step + 1, &wait)))?;
            }
            let mean_loss: f32 = Tensor::cat(losses, 0).mean().try_into_scalar().map_err(runtime_error)?;
            Ok((mean_loss, Tensor::cat(consumed, 0).try_into_vec_as::<i64>().map_err(runtime_error)?))
        })?;
        Ok((mean_loss, PyArray1::from_vec(py, consumed)))
    }
}

// --- Evaluation ------------------------------------------------------------------------------------------------------
impl Trainer {
    /// (summed loss, correct count) of one evaluation batch, on the device.
    fn eval_step(&self, model: &ResNet18, images: Tensor<4>, labels: Tensor<1, Int>) -> (Tensor<1>, Tensor<1, Int>) {
        let logits = model.forward(images);
        let [batch, _] = logits.dims();
        let correct = logits.clone().argmax(1).reshape([batch]).equal(labels.clone()).int().sum();
        (self.loss.forward(logits, labels).mul_scalar(batch as f64), correct)
    }
}

#[pymethods]
impl Trainer {
    /// (summed loss, correct count) over the test images, `eval_batch` at a time, with the running statistics.
    fn evaluate(&self, py: Python<'_>, eval_batch: NonZeroUsize) -> PyResult<(f64, i64)> {
        py.detach(|| {
            let model = self.model.valid();
            let total = self.test_labels.dims()[0];
            let (mut loss_sum, mut correct) = (Vec::new(), Vec::new());
            for start in (0..total).step_by(eval_batch.get()) {
                let end = (start + eval_batch.get()).min(total);
                let images = self.test_images.clone().slice(start..end);
                let (loss, hits) = self.eval_step(&model, images, self.test_labels.clone().slice(start..end));
                loss_sum.push(loss);
                correct.push(hits);
            }
            let loss_sum: f32 = Tensor::cat(loss_sum, 0).sum().try_into_scalar().map_err(runtime_error)?;
            let correct: i64 = Tensor::cat(correct, 0).sum().try_into_scalar().map_err(runtime_error)?;
            Ok((loss_sum as f64, correct))
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
            true => self.model.forward(images_tensor(&images, self.image(), &self.device)?),
            false => self.model.valid().forward(images_tensor(&images, self.image(), &self.device.clone().inner())?),
        };
        to_numpy(py, logits.try_into_data().map_err(runtime_error)?)
    }
}

// --- Canonical weights -----------------------------------------------------------------------------------------------
// The module paths are PyTorch's state_dict names (the field names are chosen so). burn-store's PyTorch adapters
// translate the rest: BatchNorm's gamma and beta are PyTorch's weight and bias, and burn keeps the linear weight
// [in, out], PyTorch [out, in].
#[pymethods]
impl Trainer {
    /// Start afresh from canonical weights (also checked by the Python page): model, BatchNorm statistics, optimizer,
    /// step 0.
    fn import_weights(&mut self, weights: HashMap<String, PyReadonlyArrayDyn<f32>>) -> PyResult<()> {
        let mut model = ResNet18::new(&self.recipe, &self.device);
        import_canonical(&mut model, weights)?;
        self.model = model;
        self.optimizer = make_optimizer(&self.recipe);
        self.step = 0;
        Ok(())
    }

    fn export_weights<'py>(&self, py: Python<'py>) -> PyResult<HashMap<String, Bound<'py, PyArrayDyn<f32>>>> {
        export_canonical(&self.model)?.into_iter().map(|(name, data)| Ok((name, to_numpy(py, data)?))).collect()
    }
}

fn import_canonical(model: &mut ResNet18, weights: HashMap<String, PyReadonlyArrayDyn<f32>>) -> PyResult<()> {
    let tensors = weights
        .into_iter()
        .map(|(name, array)| {
            let data = TensorData::new(array.as_array().iter().copied().collect::<Vec<f32>>(), array.shape().to_vec());
            bridge::from_data(data, name, None)
        })
        .collect();
    // apply reports names and shapes that do not fit in its result, as it must: a panic inside it aborts the process
    let result = model.apply(tensors, None, Some(Box::new(PyTorchToBurnAdapter)), false);
    let problems: Vec<String> = (result.missing.iter().map(|(path, _)| format!("{path} is missing")))
        .chain(result.unused.iter().map(|path| format!("{path} is unexpected")))
        .chain(result.errors.iter().map(ToString::to_string)) // shapes in burn's layout: the linear weight [in, out]
        .collect();
    match problems.is_empty() {
        true => Ok(()),
        false => Err(PyValueError::new_err(format!("not canonical ResNet18 weights: {}", problems.join("; ")))),
    }
}

fn export_canonical(model: &ResNet18) -> PyResult<Vec<(String, TensorData)>> {
    // `valid` folds in the running statistics' pending updates
    let tensors = model.valid().collect(None, Some(Box::new(BurnToPyTorchAdapter)), false);
    tensors
        .into_iter()
        .map(|tensor| Ok((tensor.name.clone(), bridge::into_data(tensor).map_err(runtime_error)?)))
        .collect()
}

fn to_numpy<'py>(py: Python<'py>, data: TensorData) -> PyResult<Bound<'py, PyArrayDyn<f32>>> {
    let shape = data.shape().to_vec();
    PyArray1::from_vec(py, data.try_into_vec_as::<f32>().map_err(runtime_error)?).reshape(shape)
}

#[pymodule]
fn mnist_burn(module: &Bound<'_, PyModule>) -> PyResult<()> {
    module.add_class::<Trainer>()
}
