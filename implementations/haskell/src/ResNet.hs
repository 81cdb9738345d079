{-# LANGUAGE BangPatterns, FlexibleContexts #-}
-- | ResNet18 on MNIST in Haskell: hmatrix (sgemm through OpenBLAS) with hand-derived gradients, each backward pass
-- beside its forward pass. The same model and recipe as implementations/pytorch/trainer.py, checked against it by the
-- parity suite; implementations/haskell/trainer.py drives this program from the harness (app/Main.hs: the protocol).
--
-- Sections, in the same order in every framework: model, state, train step, epoch, evaluation, canonical weights.
module ResNet
  ( BasicBlock (..), ResNet18 (..), resnet18, forward, backward, parameters, withParameters
  , Trainer (..), Dataset (..), newTrainer, resetTrainer, forceModel
  , trainStep, learningRate, trainEpoch
  , evalStep, evaluate, logits
  , importCanonical, exportCanonical, canonicalSize
  , imageSize, numClasses
  ) where

import Control.Monad.State.Strict (evalState, state)
import Data.Functor.Const (Const (..))
import Data.Int (Int32)
import Data.List (foldl', mapAccumL, mapAccumR)
import Data.Monoid (Sum (..))
import qualified Data.Vector.Storable as V
import GHC.Clock (getMonotonicTime)
import Numeric.LinearAlgebra (Matrix, cols, flatten, reshape, rows, tr)

import Layers

-- --- Model ----------------------------------------------------------------------------------------------------------
stageWidths :: [Int]
stageWidths = [64, 128, 256, 512]

numClasses, imageSize :: Int
numClasses = 10
imageSize = 28

data BasicBlock a = BasicBlock
  { conv1 :: !(Conv a), bn1 :: !(BatchNorm a), conv2 :: !(Conv a), bn2 :: !(BatchNorm a)
  , downsample :: !(Maybe (Conv a, BatchNorm a)) -- 1x1 convolution + BatchNorm where the shape changes
  }

data ResNet18 a = ResNet18
  { stemConv :: !(Conv a), stemBn :: !(BatchNorm a), blocks :: ![BasicBlock a]
  , fcWeight :: !(Matrix a), fcBias :: !(V.Vector a)
  }

-- | The architecture, all weights zero (import_canonical fills them): torchvision's ResNet18, 1 channel, 10 classes.
resnet18 :: Scalar a => ResNet18 a
resnet18 =
  ResNet18 (conv 7 2 3 1 64) (batchnormOf 64) stages (zeros (last stageWidths) numClasses) (V.replicate numClasses 0)
  where
    stages = concat (zipWith stage [1 :: Int ..] (zip (64 : stageWidths) stageWidths))
    zeros r c = reshape c (V.replicate (r * c) 0)
    conv k s p cin cout = Conv k s p (zeros (k * k * cin) cout)
    batchnormOf c = BatchNorm (V.replicate c 1) (V.replicate c 0) (V.replicate c 0) (V.replicate c 1)
    stage i (cin, cout) =
      let s = if i == 1 then 1 else 2
          down = if s /= 1 || cin /= cout then Just (conv 1 s 0 cin cout, batchnormOf cout) else Nothing
       in [ BasicBlock (conv 3 s 1 cin cout) (batchnormOf cout) (conv 3 1 1 cout cout) (batchnormOf cout) down
          , BasicBlock (conv 3 1 1 cout cout) (batchnormOf cout) (conv 3 1 1 cout cout) (batchnormOf cout) Nothing ]

-- | What a block's backward pass needs from its forward pass (lazy: evaluation never builds what it does not use).
data BlockCache a = BlockCache
  { blockInput :: Tensor a, patches1 :: Matrix a, norm1 :: BnCache a, activation1 :: Tensor a
  , patches2 :: Matrix a, norm2 :: BnCache a, shortcutCache :: Maybe (Matrix a, BnCache a), blockOutput :: Tensor a }

-- | (output, the block with its updated running statistics, cache)
blockForward :: Scalar a => Mode -> BasicBlock a -> Tensor a -> (Tensor a, BasicBlock a, BlockCache a)
{-# SPECIALIZE blockForward ::
      Mode -> BasicBlock Float -> Tensor Float -> (Tensor Float, BasicBlock Float, BlockCache Float) #-}
blockForward mode (BasicBlock c1 b1 c2 b2 down) x =
  (y, BasicBlock c1 b1' c2 b2' down', BlockCache x p1 k1 a1 p2 k2 kd y)
  where
    (z1, p1) = convForward c1 x
    (n1, b1', k1) = batchNorm mode b1 z1
    a1 = relu n1
    (z2, p2) = convForward c2 a1
    (n2, b2', k2) = batchNorm mode b2 z2
    (shortcut, down', kd) = case down of
      Nothing -> (x, Nothing, Nothing)
      Just (cd, bd) ->
        let (zd, pd) = convForward cd x
            (nd, bd', kbd) = batchNorm mode bd zd
         in (nd, Just (cd, bd'), Just (pd, kbd))
    y = relu (add n2 shortcut)

-- | (input gradient, the block's gradients in the block's own shape; running statistics left empty)
blockBackward :: Scalar a => BasicBlock a -> BlockCache a -> Tensor a -> (Tensor a, BasicBlock a)
{-# SPECIALIZE blockBackward ::
      BasicBlock Float -> BlockCache Float -> Tensor Float -> (Tensor Float, BasicBlock Float) #-}
blockBackward (BasicBlock c1 b1 c2 b2 down) (BlockCache x p1 k1 a1 p2 k2 kd y) dy =
  ( add dx1 dxShortcut
  , BasicBlock (c1 {convWeight = dw1}) (gradient dg1 db1) (c2 {convWeight = dw2}) (gradient dg2 db2) downGrad )
  where
    dsum = reluBackward y dy
    (dz2, dg2, db2) = batchNormBackward b2 k2 dsum
    (da1, dw2) = convBackward c2 (shape a1) p2 dz2
    (dz1, dg1, db1) = batchNormBackward b1 k1 (reluBackward a1 da1)
    (dx1, dw1) = convBackward c1 (shape x) p1 dz1
    (dxShortcut, downGrad) = case (down, kd) of
      (Just (cd, bd), Just (pd, kbd)) ->
        let (dzd, dgd, dbd) = batchNormBackward bd kbd dsum
            (dxd, dwd) = convBackward cd (shape x) pd dzd
         in (dxd, Just (cd {convWeight = dwd}, gradient dgd dbd))
      _ -> (dsum, Nothing)

gradient :: Scalar a => V.Vector a -> V.Vector a -> BatchNorm a
gradient dgamma dbeta = BatchNorm dgamma dbeta V.empty V.empty

data Cache a = Cache
  { stemInput :: Shape, stemPatches :: Matrix a, stemNorm :: BnCache a, stemActivation :: Tensor a
  , poolArgmax :: V.Vector Int, blockCaches :: [BlockCache a], features :: Matrix a, lastShape :: Shape }

-- | [batch * 28 * 28, 1] images -> ([batch, 10] logits, the model with updated running statistics, cache)
forward :: Scalar a => Mode -> ResNet18 a -> Tensor a -> (Matrix a, ResNet18 a, Cache a)
{-# SPECIALIZE forward :: Mode -> ResNet18 Float -> Tensor Float -> (Matrix Float, ResNet18 Float, Cache Float) #-}
forward mode (ResNet18 c b bs w bias) x =
  (linear w bias feats, ResNet18 c b' bs' w bias, Cache (shape x) p kb a argmax ks feats (shape h))
  where
    (z, p) = convForward c x
    (n, b', kb) = batchNorm mode b z
    a = relu n
    (pooled, argmax) = maxPool a
    (h, blocksAndCaches) = mapAccumL (\t blk -> let (t', blk', k) = blockForward mode blk t in (t', (blk', k)))
                                     pooled bs
    (bs', ks) = unzip blocksAndCaches
    feats = globalAvgPool h

-- | The gradients of the loss whose logits gradient is `dlogits`, in the model's own shape.
backward :: Scalar a => ResNet18 a -> Cache a -> Matrix a -> ResNet18 a
{-# SPECIALIZE backward :: ResNet18 Float -> Cache Float -> Matrix Float -> ResNet18 Float #-}
backward (ResNet18 c b bs w _) (Cache inShape p kb a argmax ks feats hShape) dlogits =
  ResNet18 (c {convWeight = dwStem}) (gradient dg db) blockGrads dw dbias
  where
    (dfeats, dw, dbias) = linearBackward w feats dlogits
    (dpooled, blockGrads) =
      mapAccumR (\d (blk, k) -> blockBackward blk k d) (globalAvgPoolBackward hShape dfeats) (zip bs ks)
    (dz, dg, db) = batchNormBackward b kb (reluBackward a (maxPoolBackward (shape a) argmax dpooled))
    (_, dwStem) = convBackward c inShape p dz -- the images need no gradient: never computed

-- | Every tensor of the model in canonical (state_dict) order, with what it is: the one traversal that SGD, the
-- canonical import/export and forcing the model share.
data Role = ConvWeight Int Int Int | Gamma | Beta | RunningMean | RunningVar | FcWeight | FcBias

trainable :: Role -> Bool
trainable RunningMean = False
trainable RunningVar = False
trainable _ = True

tensors :: (Applicative f, Scalar a) => (Role -> V.Vector a -> f (V.Vector a)) -> ResNet18 a -> f (ResNet18 a)
tensors f (ResNet18 c b bs w bias) =
  ResNet18 <$> conv c <*> bn b <*> traverse block bs <*> matrix FcWeight w <*> f FcBias bias
  where
    conv cv@(Conv k _ _ m) = (\m' -> cv {convWeight = m'}) <$> matrix (ConvWeight (cols m) (rows m `div` (k * k)) k) m
    matrix role m = reshape (cols m) <$> f role (flatten m)
    bn (BatchNorm g be rm rv) = BatchNorm <$> f Gamma g <*> f Beta be <*> f RunningMean rm <*> f RunningVar rv
    block (BasicBlock c1 b1 c2 b2 d) =
      BasicBlock <$> conv c1 <*> bn b1 <*> conv c2 <*> bn b2 <*> traverse (\(cd, bd) -> (,) <$> conv cd <*> bn bd) d

parameters :: Scalar a => ResNet18 a -> [V.Vector a]
{-# SPECIALIZE parameters :: ResNet18 Float -> [V.Vector Float] #-}
parameters = getConst . tensors (\role v -> Const [v | trainable role])

withParameters :: Scalar a => ResNet18 a -> [V.Vector a] -> ResNet18 a
{-# SPECIALIZE withParameters :: ResNet18 Float -> [V.Vector Float] -> ResNet18 Float #-}
withParameters model = evalState (tensors replace model)
  where
    replace role v = if trainable role then state (\(p : rest) -> (p, rest)) else pure v

-- | Evaluates every tensor: the model is built lazily, and a timed epoch must not leave work for later.
forceModel :: Scalar a => ResNet18 a -> ()
{-# SPECIALIZE forceModel :: ResNet18 Float -> () #-}
forceModel model = foldl' (flip seq) () (getConst (tensors (\_ v -> Const [V.length v]) model))

-- --- State ----------------------------------------------------------------------------------------------------------
data Dataset = Dataset {images :: !(V.Vector Float), labels :: !(V.Vector Int32)} -- [n, 28, 28, 1], [n]

data Trainer = Trainer
  { model :: !(ResNet18 Float), momentum :: ![V.Vector Float], step :: !Int
  , schedule :: !(V.Vector Float), trainData, testData :: !Dataset }

newTrainer :: ResNet18 Float -> V.Vector Float -> Dataset -> Dataset -> Trainer
newTrainer weights table train test = resetTrainer (Trainer weights [] 0 table train test) weights

-- | Start afresh from `weights`: momentum buffers zero (PyTorch's first step sets buf = grad, which is 0.9 * 0 + grad).
resetTrainer :: Trainer -> ResNet18 Float -> Trainer
resetTrainer t weights = t {model = weights, momentum = map (V.map (const 0)) (parameters weights), step = 0}

-- --- Train step -----------------------------------------------------------------------------------------------------
learningRate :: Trainer -> Int -> Float
learningRate t s
  | s >= 0 && s < V.length (schedule t) = schedule t V.! s
  | otherwise = error ("step " ++ show s ++ " is past the learning-rate table's " ++ show (V.length (schedule t))
                       ++ " steps")

-- | One SGD step on a batch ([batch * 28 * 28] pixels, labels): the mean loss and the trained state. PyTorch's momentum
-- formulation: buf = 0.9 * buf + grad; param -= lr * buf.
trainStep :: Trainer -> V.Vector Float -> V.Vector Int -> (Double, Trainer)
trainStep t pixels ys =
  (lossSum / fromIntegral (V.length ys), t {model = withParameters model' params', momentum = bufs', step = step t + 1})
  where
    input = Tensor (Shape (V.length ys) imageSize imageSize 1) pixels
    (out, model', cache) = forward Train (model t) input
    (lossSum, _, dlogits) = crossEntropy out ys
    grads = parameters (backward (model t) cache dlogits)
    lr = learningRate t (step t)
    bufs' = zipWith (pointwise (\buf g -> 0.9 * buf + g)) (momentum t) grads
    params' = zipWith (pointwise (\p buf -> p - lr * buf)) (parameters model') bufs'

-- --- Epoch ----------------------------------------------------------------------------------------------------------
gather :: Dataset -> V.Vector Int32 -> (V.Vector Float, V.Vector Int)
gather (Dataset imgs labs) indices =
  ( V.concatMap (\i -> V.slice (fromIntegral i * pixels) pixels imgs) indices
  , V.map (\i -> fromIntegral (labs V.! fromIntegral i)) indices )
  where
    pixels = imageSize * imageSize

-- | Train on the epoch's batches ([steps * batch] indices, in the contract's order): (trainer, mean loss, seconds,
-- the labels consumed). Every step is forced before the next, so the time is the work's.
trainEpoch :: Trainer -> Int -> V.Vector Int32 -> IO (Trainer, Double, Double, V.Vector Int)
trainEpoch t0 batchSize indices = do
  start <- getMonotonicTime
  let steps = V.length indices `div` batchSize
      go !t !total s
        | s == steps = pure (t, total)
        | otherwise = do
            let (pixels, ys) = gather (trainData t) (V.slice (s * batchSize) batchSize indices)
                (loss, t') = trainStep t pixels ys
            loss `seq` forceModel (model t') `seq` go t' (total + loss) (s + 1)
  (trained, total) <- go t0 0 0
  end <- getMonotonicTime
  pure (trained, total / fromIntegral steps, end - start, snd (gather (trainData t0) indices))

-- --- Evaluation -----------------------------------------------------------------------------------------------------
-- | Eval-mode (summed loss, correct count) of one batch of images and labels (the PyTorch page's device_eval_step).
evalStep :: Trainer -> V.Vector Float -> V.Vector Int -> (Double, Int)
evalStep t pixels ys = (loss, correct)
  where
    (loss, correct, _) = crossEntropy (logits t Eval pixels) ys

-- | Eval-mode (summed loss, correct count) over the test set, `batchSize` images at a time.
evaluate :: Trainer -> Int -> (Double, Int)
evaluate t batchSize = foldl' accumulate (0, 0) [0, batchSize .. n - batchSize]
  where
    Dataset imgs labs = testData t
    n = V.length labs
    pixels = imageSize * imageSize
    accumulate (!loss, !correct) start =
      let images' = V.slice (start * pixels) (batchSize * pixels) imgs
          (l, c) = evalStep t images' (V.map fromIntegral (V.slice start batchSize labs))
       in (loss + l, correct + c)

-- | [batch, 10] logits of a batch of images; Train normalizes with batch statistics (the running statistics it would
-- update are dropped).
logits :: Trainer -> Mode -> V.Vector Float -> Matrix Float
logits t mode pixels = out
  where
    images' = Tensor (Shape (V.length pixels `div` (imageSize * imageSize)) imageSize imageSize 1) pixels
    (out, _, _) = forward mode (model t) images'

-- --- Canonical weights ----------------------------------------------------------------------------------------------
-- Canonical = PyTorch's state_dict order and layouts, all tensors concatenated: convolutions OIHW (here [kh, kw, in,
-- out]), the linear weight [out, in] (here [in, out]), BatchNorm weight, bias, running mean, running variance.
canonicalSize :: Int
canonicalSize = getSum (getConst (tensors (\_ v -> Const (Sum (V.length v))) (resnet18 :: ResNet18 Float)))

importCanonical :: Scalar a => V.Vector a -> ResNet18 a
importCanonical flat
  | V.length flat /= canonicalSize =
      error ("canonical weights: " ++ show (V.length flat) ++ " values, expected " ++ show canonicalSize)
  | otherwise = evalState (tensors take' resnet18) 0
  where
    take' role old = state $ \offset ->
      let v = V.slice offset (V.length old) flat in (fromCanonical role v, offset + V.length old)
    fromCanonical (ConvWeight o i k) v = V.generate (V.length v) $ \idx ->
      let (rest, co) = idx `quotRem` o
          (pixel, ci) = rest `quotRem` i
          (kh, kw) = pixel `quotRem` k
       in v V.! (((co * i + ci) * k + kh) * k + kw)
    fromCanonical FcWeight v = flatten (tr (reshape (last stageWidths) v))
    fromCanonical _ v = V.force v

exportCanonical :: ResNet18 Float -> V.Vector Float
exportCanonical = V.concat . getConst . tensors (\role v -> Const [toCanonical role v])
  where
    toCanonical (ConvWeight o i k) v = V.generate (V.length v) $ \idx ->
      let (rest, kw) = idx `quotRem` k
          (rest2, kh) = rest `quotRem` k
          (co, ci) = rest2 `quotRem` i
       in v V.! (((kh * k + kw) * i + ci) * o + co)
    toCanonical FcWeight v = flatten (tr (reshape numClasses v))
    toCanonical _ v = v
