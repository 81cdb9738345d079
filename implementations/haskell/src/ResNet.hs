{-# LANGUAGE BangPatterns, FlexibleContexts #-}
-- | ResNet18 on MNIST in Haskell: hmatrix (sgemm through OpenBLAS) with hand-derived gradients, each backward pass
-- beside its forward pass. The same model and recipe as implementations/pytorch/trainer.py, checked against it by the
-- parity suite; implementations/haskell/trainer.py drives this program from the harness (app/Main.hs: the protocol).
--
-- Sections, in the same order in every framework: model, state, train step, epoch, evaluation, canonical weights.
module ResNet
  ( Recipe (..), imageSize, BasicBlock (..), ResNet18 (..), resnet18, forward, backward, parameters, withParameters
  , forceModel
  , Dataset (..), TrainState (..), newTrainState, startFrom, trainableParameters
  , trainStep, trainOnBatch, learningRates
  , trainBatches
  , evalStep, evaluate, logits
  , importCanonical, exportCanonical, canonicalSize
  ) where

import Control.Monad.State.Strict (evalState, state)
import Data.Functor.Const (Const (..))
import Data.Int (Int32)
import Data.List (foldl', mapAccumL, mapAccumR)
import Data.Monoid (Sum (..))
import qualified Data.Vector.Storable as V
import GHC.Clock (getMonotonicTime)
import GHC.Float (double2Float)
import Numeric.LinearAlgebra (Matrix, cols, flatten, reshape, rows, tr)

import Layers

-- --- Model ----------------------------------------------------------------------------------------------------------
-- | contract.recipe(), which trainer.py sends before anything else: the program states none of it itself.
data Recipe = Recipe
  { bnEpsilon, bnMomentum :: !Double -- BatchNorm's, in PyTorch's convention
  , sgdMomentum :: !Double -- PyTorch's formulation: buf = momentum * buf + grad; param -= lr * buf
  , stageWidths :: ![Int], numClasses :: !Int }

imageSize :: Int
imageSize = 28

data BasicBlock a = BasicBlock
  { conv1 :: !(Conv a), bn1 :: !(BatchNorm a), conv2 :: !(Conv a), bn2 :: !(BatchNorm a)
  , downsample :: !(Maybe (Conv a, BatchNorm a)) -- 1x1 convolution + BatchNorm where the shape changes
  }

data ResNet18 a = ResNet18
  { stemConv :: !(Conv a), stemBn :: !(BatchNorm a), blocks :: ![BasicBlock a]
  , fcWeight :: !(Matrix a), fcBias :: !(V.Vector a)
  }

-- | The architecture, all weights zero (importCanonical fills them): torchvision's ResNet18 for 1 channel.
resnet18 :: Scalar a => Recipe -> ResNet18 a
resnet18 (Recipe eps m _ widths classes) =
  ResNet18 (conv 7 2 3 1 stem) (batchnormOf stem) stages (zeros (last widths) classes) (V.replicate classes 0)
  where
    stem = head widths
    stages = concat (zipWith stage [1 :: Int ..] (zip (stem : widths) widths))
    zeros r c = reshape c (V.replicate (r * c) 0)
    conv k s p cin cout = Conv k s p (zeros (k * k * cin) cout)
    batchnormOf c = BatchNorm eps m (V.replicate c 1) (V.replicate c 0) (V.replicate c 0) (V.replicate c 1)
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
  , BasicBlock (c1 {convWeight = dw1}) (gradient b1 dg1 db1) (c2 {convWeight = dw2}) (gradient b2 dg2 db2) downGrad )
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
         in (dxd, Just (cd {convWeight = dwd}, gradient bd dgd dbd))
      _ -> (dsum, Nothing)

gradient :: Scalar a => BatchNorm a -> V.Vector a -> V.Vector a -> BatchNorm a
gradient bn dgamma dbeta = bn {gamma = dgamma, beta = dbeta, runningMean = V.empty, runningVar = V.empty}

data Cache a = Cache
  { stemInput :: Shape, stemPatches :: Matrix a, stemNorm :: BnCache a, stemActivation :: Tensor a
  , poolArgmax :: V.Vector Int, blockCaches :: [BlockCache a], features :: Matrix a, lastShape :: Shape }

-- | [batch * 28 * 28, 1] images -> ([batch, classes] logits, the model with updated running statistics, cache)
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
  ResNet18 (c {convWeight = dwStem}) (gradient b dg db) blockGrads dw dbias
  where
    (dfeats, dw, dbias) = linearBackward w feats dlogits
    (dpooled, blockGrads) =
      mapAccumR (\d (blk, k) -> blockBackward blk k d) (globalAvgPoolBackward hShape dfeats) (zip bs ks)
    (dz, dg, db) = batchNormBackward b kb (reluBackward a (maxPoolBackward (shape a) argmax dpooled))
    (_, dwStem) = convBackward c inShape p dz -- the images need no gradient: never computed

-- | Every tensor of the model in canonical (state_dict) order, with what it is: the one traversal that SGD, the
-- canonical import/export and forcing the model share.
data Role = ConvWeight Int Int Int | Gamma | Beta | RunningMean | RunningVar | FcWeight Int Int | FcBias

trainable :: Role -> Bool
trainable RunningMean = False
trainable RunningVar = False
trainable _ = True

tensors :: (Applicative f, Scalar a) => (Role -> V.Vector a -> f (V.Vector a)) -> ResNet18 a -> f (ResNet18 a)
tensors f (ResNet18 c b bs w bias) =
  ResNet18 <$> conv c <*> bn b <*> traverse block bs <*> matrix (FcWeight (cols w) (rows w)) w <*> f FcBias bias
  where
    conv cv@(Conv k _ _ m) = (\m' -> cv {convWeight = m'}) <$> matrix (ConvWeight (cols m) (rows m `div` (k * k)) k) m
    matrix role m = reshape (cols m) <$> f role (flatten m)
    bn (BatchNorm e m g be rm rv) = BatchNorm e m <$> f Gamma g <*> f Beta be <*> f RunningMean rm <*> f RunningVar rv
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

data TrainState = TrainState
  { recipe :: !Recipe, model :: !(ResNet18 Float), momentumBuffers :: ![V.Vector Float], step :: !Int
  , schedule :: !(V.Vector Float), trainData, testData :: !Dataset }

-- | The recipe's model, all zero, before the set-up requests bring the schedule, the data and the weights.
newTrainState :: Recipe -> TrainState
newTrainState r = startFrom zero (TrainState r zero [] 0 V.empty none none)
  where
    zero = resnet18 r
    none = Dataset V.empty V.empty

-- | Start afresh from `weights`: momentum buffers zero (PyTorch's first step sets buf = grad, which is m * 0 + grad).
startFrom :: ResNet18 Float -> TrainState -> TrainState
startFrom weights t = t {model = weights, momentumBuffers = map (V.map (const 0)) (parameters weights), step = 0}

-- | Convolution and linear weights, the linear bias, BatchNorm weights and biases; not the running statistics.
trainableParameters :: ResNet18 Float -> Int
trainableParameters = sum . map V.length . parameters

-- --- Train step -----------------------------------------------------------------------------------------------------
learningRate :: TrainState -> Int -> Float
learningRate t s
  | s >= 0 && s < V.length (schedule t) = schedule t V.! s
  | otherwise = error ("step " ++ show s ++ " is past the learning-rate table's " ++ show (V.length (schedule t))
                       ++ " steps")

-- | One SGD step on a batch in the program ([batch * 28 * 28] pixels, labels): the mean loss and the trained state,
-- unevaluated. PyTorch's momentum formulation: buf = momentum * buf + grad; param -= lr * buf.
trainStep :: TrainState -> V.Vector Float -> V.Vector Int -> (Double, TrainState)
trainStep t pixels ys =
  ( lossSum / fromIntegral (V.length ys)
  , t {model = withParameters model' params', momentumBuffers = bufs', step = step t + 1} )
  where
    input = Tensor (Shape (V.length ys) imageSize imageSize 1) pixels
    (out, model', cache) = forward Train (model t) input
    (lossSum, _, dlogits) = crossEntropy out ys
    grads = parameters (backward (model t) cache dlogits)
    lr = learningRate t (step t)
    m = double2Float (sgdMomentum (recipe t))
    bufs' = zipWith (pointwise (\buf g -> m * buf + g)) (momentumBuffers t) grads
    params' = zipWith (pointwise (\p buf -> p - lr * buf)) (parameters model') bufs'

-- | One step on a batch from outside the program (pixels and int32 labels, as the protocol reads them), evaluated
-- through, as Keras' train_on_batch: the mean loss and the trained state.
trainOnBatch :: TrainState -> V.Vector Float -> V.Vector Int32 -> (Double, TrainState)
trainOnBatch t pixels labels = loss `seq` forceModel (model t') `seq` (loss, t')
  where
    (loss, t') = trainStep t pixels (V.map fromIntegral labels)

learningRates :: TrainState -> V.Vector Int32 -> V.Vector Float
learningRates t = V.map (learningRate t . fromIntegral)

-- --- Epoch ----------------------------------------------------------------------------------------------------------
gather :: Dataset -> V.Vector Int32 -> (V.Vector Float, V.Vector Int)
gather (Dataset imgs labs) indices =
  ( V.concatMap (\i -> V.slice (fromIntegral i * pixels) pixels imgs) indices
  , V.map (\i -> fromIntegral (labs V.! fromIntegral i)) indices )
  where
    pixels = imageSize * imageSize

-- | Train on `batches` ([steps * batch] indices, in the contract's order), telling `progress` the steps done after
-- each one: (state, mean loss, seconds, the labels consumed). Every step is forced before the next, so the time is
-- the work's.
trainBatches :: TrainState -> Int -> V.Vector Int32 -> (Int -> IO ()) -> IO (TrainState, Double, Double, V.Vector Int)
trainBatches t0 batchSize batches progress = do
  start <- getMonotonicTime
  let steps = V.length batches `div` batchSize
      go !t !total s
        | s == steps = pure (t, total)
        | otherwise = do
            let (pixels, ys) = gather (trainData t) (V.slice (s * batchSize) batchSize batches)
                (loss, t') = trainStep t pixels ys
            loss `seq` forceModel (model t') `seq` progress (s + 1)
            go t' (total + loss) (s + 1)
  (trained, total) <- go t0 0 0
  end <- getMonotonicTime
  pure (trained, total / fromIntegral steps, end - start, snd (gather (trainData t0) batches))

-- --- Evaluation -----------------------------------------------------------------------------------------------------
-- | Eval-mode (summed loss, correct count) of one batch of images and labels.
evalStep :: TrainState -> V.Vector Float -> V.Vector Int -> (Double, Int)
evalStep t pixels ys = (loss, correct)
  where
    (loss, correct, _) = crossEntropy (logits t Eval pixels) ys

-- | Eval-mode (summed loss, correct count) over the test set, `batchSize` images at a time.
evaluate :: TrainState -> Int -> (Double, Int)
evaluate t batchSize = foldl' accumulate (0, 0) [0, batchSize .. n - batchSize]
  where
    Dataset imgs labs = testData t
    n = V.length labs
    pixels = imageSize * imageSize
    accumulate (!loss, !correct) start =
      let images' = V.slice (start * pixels) (batchSize * pixels) imgs
          (l, c) = evalStep t images' (V.map fromIntegral (V.slice start batchSize labs))
       in (loss + l, correct + c)

-- | [batch, classes] logits of a batch of images; Train normalizes with batch statistics (the running statistics it
-- would update are dropped).
logits :: TrainState -> Mode -> V.Vector Float -> Matrix Float
logits t mode pixels = out
  where
    images' = Tensor (Shape (V.length pixels `div` (imageSize * imageSize)) imageSize imageSize 1) pixels
    (out, _, _) = forward mode (model t) images'

-- --- Canonical weights ----------------------------------------------------------------------------------------------
-- Canonical = PyTorch's state_dict order and layouts, all tensors concatenated: convolutions OIHW (here [kh, kw, in,
-- out]), the linear weight [out, in] (here [in, out]), BatchNorm weight, bias, running mean, running variance.
canonicalSize :: Recipe -> Int
canonicalSize r = getSum (getConst (tensors (\_ v -> Const (Sum (V.length v))) (resnet18 r :: ResNet18 Float)))

-- | The recipe's model with the canonical weights.
importCanonical :: Scalar a => Recipe -> V.Vector a -> ResNet18 a
importCanonical r flat
  | V.length flat /= canonicalSize r =
      error ("canonical weights: " ++ show (V.length flat) ++ " values, expected " ++ show (canonicalSize r))
  | otherwise = evalState (tensors take' (resnet18 r)) 0
  where
    take' role old = state $ \offset ->
      let v = V.slice offset (V.length old) flat in (fromCanonical role v, offset + V.length old)
    fromCanonical (ConvWeight o i k) v = V.generate (V.length v) $ \idx ->
      let (rest, co) = idx `quotRem` o
          (pixel, ci) = rest `quotRem` i
          (kh, kw) = pixel `quotRem` k
       in v V.! (((co * i + ci) * k + kh) * k + kw)
    fromCanonical (FcWeight _ i) v = flatten (tr (reshape i v))
    fromCanonical _ v = V.force v

exportCanonical :: ResNet18 Float -> V.Vector Float
exportCanonical = V.concat . getConst . tensors (\role v -> Const [toCanonical role v])
  where
    toCanonical (ConvWeight o i k) v = V.generate (V.length v) $ \idx ->
      let (rest, kw) = idx `quotRem` k
          (rest2, kh) = rest `quotRem` k
          (co, ci) = rest2 `quotRem` i
       in v V.! (((kh * k + kw) * i + ci) * o + co)
    toCanonical (FcWeight o _) v = flatten (tr (reshape o v))
    toCanonical _ v = v
