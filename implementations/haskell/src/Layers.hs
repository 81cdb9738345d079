{-# LANGUAGE BangPatterns, ConstraintKinds, FlexibleContexts #-}
-- | ResNet18's layers, each backward pass beside its forward pass, written over hmatrix (sgemm through OpenBLAS).
--
-- Activations are NHWC, stored as a row-major matrix [batch * height * width, channels]: a convolution is then one
-- im2col copy of contiguous channel runs and one matrix product whose result is already the next NHWC activation, and
-- BatchNorm's per-channel statistics run down the columns. Every function is polymorphic in the scalar: the model
-- trains in Float (the SPECIALIZE pragmas compile those versions), the gradient checks (test/GradientCheck.hs) run the
-- same code in Double.
module Layers
  ( Scalar, Shape (..), Tensor (..), Mode (..), rowCount, matmul, pointwise
  , Conv (..), convForward, convBackward
  , BatchNorm (..), BnCache, batchNorm, batchNormBackward
  , relu, reluBackward, add
  , maxPool, maxPoolBackward
  , globalAvgPool, globalAvgPoolBackward
  , linear, linearBackward
  , crossEntropy
  ) where

import qualified Data.Vector.Storable as V
import GHC.Float (double2Float, float2Double)
import qualified Data.Vector.Storable.Mutable as MV
import Numeric.LinearAlgebra (Matrix, Numeric, cols, flatten, reshape, tr)
import qualified Numeric.LinearAlgebra as LA

-- | Float or Double, with the conversions that statistics accumulated in Double need (fromDouble would go through
-- Rational wherever GHC does not specialise it).
class (Numeric a, RealFloat a) => Scalar a where
  toDouble :: a -> Double
  fromDouble :: Double -> a

instance Scalar Float where
  toDouble = float2Double
  fromDouble = double2Float

instance Scalar Double where
  toDouble = id
  fromDouble = id

data Shape = Shape {batch, height, width, channels :: !Int} deriving (Eq, Show)

data Tensor a = Tensor {shape :: !Shape, values :: !(V.Vector a)}

data Mode = Train | Eval deriving (Eq, Show)

rowCount :: Shape -> Int
rowCount (Shape b h w _) = b * h * w

asMatrix :: Scalar a => Tensor a -> Matrix a
{-# SPECIALIZE asMatrix :: Tensor Float -> Matrix Float #-}
asMatrix (Tensor s v) = reshape (channels s) v

-- | Row-major product. hmatrix's gemm writes a column-major result; computing (Bᵀ Aᵀ)ᵀ with O(1) transposes lands
-- the product row-major, so that `flatten` hands back its buffer without a copy.
matmul :: Numeric a => Matrix a -> Matrix a -> Matrix a
{-# SPECIALIZE matmul :: Matrix Float -> Matrix Float -> Matrix Float #-}
matmul a b = tr (tr b LA.<> tr a)

(!) :: V.Storable a => V.Vector a -> Int -> a
(!) = V.unsafeIndex
{-# INLINE (!) #-}

for :: Monad m => Int -> Int -> (Int -> m ()) -> m ()
for from to body = go from
  where
    go !i
      | i >= to = pure ()
      | otherwise = body i >> go (i + 1)
{-# INLINE for #-}

-- | Per-channel sums over the rows of an [n, c] layout, accumulated in Double; `term` gets the flat index and channel.
channelSums :: Int -> Int -> (Int -> Int -> Double) -> V.Vector Double
channelSums n c term = V.create $ do
  sums <- MV.replicate c 0
  for 0 n $ \r -> for 0 c $ \ch -> MV.unsafeModify sums (+ term (r * c + ch) ch) ch
  pure sums
{-# INLINE channelSums #-}

-- | Elementwise on two vectors of one length, by index: vector 0.12's Storable zipWith boxes every element (measured:
-- 15 times its output's size allocated, 10 times slower).
pointwise :: (V.Storable a, V.Storable b, V.Storable c) => (a -> b -> c) -> V.Vector a -> V.Vector b -> V.Vector c
pointwise f x y = V.generate (V.length x) (\i -> f (x ! i) (y ! i))
{-# INLINE pointwise #-}

-- | Maps an [n, c] layout element by element; `f` gets the channel, the flat index and the value. Loops rather than
-- imap: a `rem` per element cost more than the arithmetic.
perChannel :: V.Storable a => Int -> (Int -> Int -> a -> a) -> V.Vector a -> V.Vector a
perChannel c f x = V.create $ do
  out <- MV.unsafeNew (V.length x)
  for 0 (V.length x `quot` c) $ \r -> for 0 c $ \ch -> let i = r * c + ch in MV.unsafeWrite out i (f ch i (x ! i))
  pure out
{-# INLINE perChannel #-}

-- == Convolution: im2col + sgemm ==
-- | Weight as a [kernel * kernel * in, out] matrix, rows ordered (kh, kw, in): the im2col patch order.
data Conv a = Conv {kernel, stride, padding :: !Int, convWeight :: !(Matrix a)}

outSize :: Int -> Int -> Int -> Int -> Int
outSize k s p n = (n + 2 * p - k) `div` s + 1

-- | Patches [batch * outH * outW, k * k * channels]; zero where the window leaves the image.
im2col :: Scalar a => Int -> Int -> Int -> Tensor a -> Matrix a
{-# SPECIALIZE im2col :: Int -> Int -> Int -> Tensor Float -> Matrix Float #-}
im2col k s p (Tensor (Shape b h w c) x) = reshape (k * k * c) $ V.create $ do
  patches <- MV.replicate (b * oh * ow * k * k * c) 0
  for 0 (b * oh * ow) $ \r -> do
    let (n, pixel) = r `quotRem` (oh * ow)
        (i, j) = pixel `quotRem` ow
    for 0 k $ \di -> do
      let y = i * s - p + di
      if y < 0 || y >= h then pure () else for 0 k $ \dj -> do
        let x' = j * s - p + dj
        if x' < 0 || x' >= w then pure () else
          V.unsafeCopy (MV.unsafeSlice (((r * k + di) * k + dj) * c) c patches)
                       (V.unsafeSlice (((n * h + y) * w + x') * c) c x)
  pure patches
  where
    oh = outSize k s p h
    ow = outSize k s p w

-- | im2col's adjoint: patch gradients summed back onto the pixels they were copied from.
col2im :: Scalar a => Int -> Int -> Int -> Shape -> V.Vector a -> V.Vector a
{-# SPECIALIZE col2im :: Int -> Int -> Int -> Shape -> V.Vector Float -> V.Vector Float #-}
col2im k s p (Shape b h w c) dpatches = V.create $ do
  dx <- MV.replicate (b * h * w * c) 0
  for 0 (b * oh * ow) $ \r -> do
    let (n, pixel) = r `quotRem` (oh * ow)
        (i, j) = pixel `quotRem` ow
    for 0 k $ \di -> do
      let y = i * s - p + di
      if y < 0 || y >= h then pure () else for 0 k $ \dj -> do
        let x' = j * s - p + dj
        if x' < 0 || x' >= w then pure () else
          let (to, from) = ((((n * h + y) * w + x') * c), (((r * k + di) * k + dj) * c))
           in for 0 c $ \t -> MV.unsafeModify dx (+ dpatches ! (from + t)) (to + t)
  pure dx
  where
    oh = outSize k s p h
    ow = outSize k s p w

-- | The output and the patches, which the backward pass multiplies with the output gradient.
convForward :: Scalar a => Conv a -> Tensor a -> (Tensor a, Matrix a)
{-# SPECIALIZE convForward :: Conv Float -> Tensor Float -> (Tensor Float, Matrix Float) #-}
convForward (Conv k s p weight) x = (Tensor outShape (flatten (matmul patches weight)), patches)
  where
    Shape b h w _ = shape x
    outShape = Shape b (outSize k s p h) (outSize k s p w) (cols weight)
    patches = im2col k s p x

-- | (input gradient, weight gradient). Lazy: the stem never demands its input gradient, so it is never computed.
convBackward :: Scalar a => Conv a -> Shape -> Matrix a -> Tensor a -> (Tensor a, Matrix a)
{-# SPECIALIZE convBackward :: Conv Float -> Shape -> Matrix Float -> Tensor Float -> (Tensor Float, Matrix Float) #-}
convBackward (Conv k s p weight) inShape patches dy = (Tensor inShape dx, matmul (tr patches) dyMatrix)
  where
    dyMatrix = asMatrix dy
    dx = col2im k s p inShape (flatten (matmul dyMatrix (tr weight)))

-- == BatchNorm ==
-- | Its settings travel with it, as nn.BatchNorm2d's eps and momentum do. The momentum is PyTorch's convention:
-- running = (1 - momentum) * running + momentum * batch statistic.
data BatchNorm a = BatchNorm {epsilon, momentum :: !Double, gamma, beta, runningMean, runningVar :: !(V.Vector a)}

-- | What the backward pass needs: the normalized input and 1 / sqrt(biased batch variance + eps), per channel.
data BnCache a = BnCache {normalized :: V.Vector a, invStd :: V.Vector a}

-- | Train: normalize with the batch statistics (biased variance), update the running statistics with the unbiased
-- variance, as PyTorch does. Eval: normalize with the running statistics; the cache is never demanded.
batchNorm :: Scalar a => Mode -> BatchNorm a -> Tensor a -> (Tensor a, BatchNorm a, BnCache a)
{-# SPECIALIZE batchNorm ::
      Mode -> BatchNorm Float -> Tensor Float -> (Tensor Float, BatchNorm Float, BnCache Float) #-}
batchNorm Eval bn@(BatchNorm eps _ g b rm rv) (Tensor s x) =
  (Tensor s y, bn, error "eval-mode BatchNorm has no backward pass")
  where
    scale = pointwise (\gi vi -> fromDouble (toDouble gi / sqrt (toDouble vi + eps))) g rv
    y = perChannel (channels s) (\ch _ xi -> (xi - rm ! ch) * scale ! ch + b ! ch) x
batchNorm Train bn@(BatchNorm eps m g b rm rv) (Tensor s x) =
  (Tensor s y, bn {runningMean = rm', runningVar = rv'}, BnCache xhat inv)
  where
    (n, c) = (rowCount s, channels s)
    count = fromIntegral n
    mean = V.map (/ count) (channelSums n c (\i _ -> toDouble (x ! i)))
    var = V.map (/ count) (channelSums n c (\i ch -> let d = toDouble (x ! i) - mean ! ch in d * d))
    inv = V.map (\v -> fromDouble (1 / sqrt (v + eps))) var
    meanA = V.map fromDouble mean
    xhat = perChannel c (\ch _ xi -> (xi - meanA ! ch) * inv ! ch) x
    y = perChannel c (\ch _ h -> h * g ! ch + b ! ch) xhat
    running old new = fromDouble ((1 - m) * toDouble old + m * new)
    rm' = pointwise running rm mean
    rv' = pointwise running rv (V.map (* (count / (count - 1))) var)

-- | (input gradient, gamma gradient, beta gradient) through batch statistics.
batchNormBackward :: Scalar a => BatchNorm a -> BnCache a -> Tensor a -> (Tensor a, V.Vector a, V.Vector a)
{-# SPECIALIZE batchNormBackward ::
      BatchNorm Float -> BnCache Float -> Tensor Float -> (Tensor Float, V.Vector Float, V.Vector Float) #-}
batchNormBackward bn (BnCache xhat inv) (Tensor s dy) = (Tensor s dx, V.map fromDouble dgamma, V.map fromDouble dbeta)
  where
    (n, c) = (rowCount s, channels s)
    count = fromIntegral n
    dbeta = channelSums n c (\i _ -> toDouble (dy ! i))
    dgamma = channelSums n c (\i _ -> toDouble (dy ! i) * toDouble (xhat ! i))
    scale = pointwise (*) (gamma bn) inv
    meanDy = V.map (fromDouble . (/ count)) dbeta
    meanDyXhat = V.map (fromDouble . (/ count)) dgamma
    dx = perChannel c (\ch i d -> scale ! ch * (d - meanDy ! ch - xhat ! i * meanDyXhat ! ch)) dy

-- == ReLU and the residual sum ==
relu :: Scalar a => Tensor a -> Tensor a
{-# SPECIALIZE relu :: Tensor Float -> Tensor Float #-}
relu (Tensor s x) = Tensor s (V.map (max 0) x)

-- | Through the ReLU's output, as PyTorch does: the gradient passes where the output is positive.
reluBackward :: Scalar a => Tensor a -> Tensor a -> Tensor a
{-# SPECIALIZE reluBackward :: Tensor Float -> Tensor Float -> Tensor Float #-}
reluBackward (Tensor _ y) (Tensor s dy) = Tensor s (pointwise (\yi d -> if yi > 0 then d else 0) y dy)

add :: Scalar a => Tensor a -> Tensor a -> Tensor a
{-# SPECIALIZE add :: Tensor Float -> Tensor Float -> Tensor Float #-}
add (Tensor s x) (Tensor _ y) = Tensor s (pointwise (+) x y)

-- == Max pool 3x3, stride 2, padding 1 ==
-- | The pooled tensor and, per output, the flat input index of its maximum: the first one in row-major window order,
-- PyTorch's tie rule. Padding is -inf: positions outside the image are skipped.
maxPool :: Scalar a => Tensor a -> (Tensor a, V.Vector Int)
{-# SPECIALIZE maxPool :: Tensor Float -> (Tensor Float, V.Vector Int) #-}
maxPool (Tensor (Shape b h w c) x) = (Tensor (Shape b oh ow c) (V.map (x !) argmax), argmax)
  where
    (oh, ow) = (outSize 3 2 1 h, outSize 3 2 1 w)
    argmax = V.create $ do
      best <- MV.replicate (b * oh * ow * c) (-1)
      for 0 (b * oh * ow) $ \r -> do
        let (n, pixel) = r `quotRem` (oh * ow)
            (i, j) = pixel `quotRem` ow
        for (max 0 (2 * i - 1)) (min h (2 * i + 2)) $ \y -> for (max 0 (2 * j - 1)) (min w (2 * j + 2)) $ \x' ->
          for 0 c $ \ch -> do
            let candidate = ((n * h + y) * w + x') * c + ch
            current <- MV.unsafeRead best (r * c + ch)
            if current < 0 || x ! candidate > x ! current then MV.unsafeWrite best (r * c + ch) candidate else pure ()
      pure best

maxPoolBackward :: Scalar a => Shape -> V.Vector Int -> Tensor a -> Tensor a
{-# SPECIALIZE maxPoolBackward :: Shape -> V.Vector Int -> Tensor Float -> Tensor Float #-}
maxPoolBackward inShape argmax (Tensor _ dy) = Tensor inShape $ V.create $ do
  dx <- MV.replicate (rowCount inShape * channels inShape) 0
  for 0 (V.length dy) $ \o -> MV.unsafeModify dx (+ dy ! o) (argmax ! o)
  pure dx

-- == Global average pool and the linear layer ==
-- | [batch * h * w, c] -> [batch, c] means.
globalAvgPool :: Scalar a => Tensor a -> Matrix a
{-# SPECIALIZE globalAvgPool :: Tensor Float -> Matrix Float #-}
globalAvgPool (Tensor (Shape b h w c) x) = reshape c $ V.generate (b * c) $ \o ->
  let (n, ch) = o `quotRem` c
   in sum [x ! ((n * h * w + p) * c + ch) | p <- [0 .. h * w - 1]] / fromIntegral (h * w)

globalAvgPoolBackward :: Scalar a => Shape -> Matrix a -> Tensor a
{-# SPECIALIZE globalAvgPoolBackward :: Shape -> Matrix Float -> Tensor Float #-}
globalAvgPoolBackward s@(Shape _ h w c) dfeatures = Tensor s $ V.generate (rowCount s * c) $ \i ->
  let (r, ch) = i `quotRem` c in d ! ((r `quot` (h * w)) * c + ch) / fromIntegral (h * w)
  where
    d = flatten dfeatures

-- | Weight [in, out] (the canonical [out, in] transposed once, on import): logits = features · weight + bias.
linear :: Scalar a => Matrix a -> V.Vector a -> Matrix a -> Matrix a
{-# SPECIALIZE linear :: Matrix Float -> V.Vector Float -> Matrix Float -> Matrix Float #-}
linear weight bias features = reshape (V.length bias) (perChannel (V.length bias) (\o _ z -> z + bias ! o) product')
  where
    product' = flatten (matmul features weight)

-- | (features gradient, weight gradient, bias gradient).
linearBackward :: Scalar a => Matrix a -> Matrix a -> Matrix a -> (Matrix a, Matrix a, V.Vector a)
{-# SPECIALIZE linearBackward ::
      Matrix Float -> Matrix Float -> Matrix Float -> (Matrix Float, Matrix Float, V.Vector Float) #-}
linearBackward weight features dlogits = (matmul dlogits (tr weight), matmul (tr features) dlogits, dbias)
  where
    d = flatten dlogits
    dbias = V.map fromDouble (channelSums (LA.rows dlogits) (cols dlogits) (\i _ -> toDouble (d ! i)))

-- == Softmax cross-entropy ==
-- | (summed loss, correct predictions, gradient of the batch-mean loss w.r.t. the logits).
crossEntropy :: Scalar a => Matrix a -> V.Vector Int -> (Double, Int, Matrix a)
{-# SPECIALIZE crossEntropy :: Matrix Float -> V.Vector Int -> (Double, Int, Matrix Float) #-}
crossEntropy logits labels = (sum losses, length (filter id hits), reshape k (V.concat grads))
  where
    (b, k) = (LA.rows logits, cols logits)
    z = flatten logits
    (losses, hits, grads) = unzip3 (map row [0 .. b - 1])
    row r =
      let zs = V.map toDouble (V.slice (r * k) k z)
          label = labels ! r
          top = V.maximum zs
          logSumExp = top + log (V.sum (V.map (\v -> exp (v - top)) zs))
          grad = V.imap (\o v -> fromDouble ((exp (v - logSumExp) - if o == label then 1 else 0) / fromIntegral b)) zs
       in (logSumExp - zs ! label, V.maxIndex zs == label, grad)
