-- | Every hand-derived backward pass against central finite differences, in Double, on the smallest shapes that
-- exercise it (stride, padding, channels, more than one image), then the whole ResNet18 on a batch of four images.
--
-- Each check takes the scalar  L = sum (output * r)  for a fixed pseudo-random r, so the backward pass runs with
-- dy = r, and compares the gradient it returns with (L(x + h) - L(x - h)) / 2h, coordinate by coordinate:
-- relative error  |analytic - numeric| / max(|analytic|, |numeric|)  in the Euclidean norm over the coordinates.
module Main (main) where

import Control.Monad (unless)
import qualified Data.Vector.Storable as V
import Numeric.LinearAlgebra (Matrix, flatten, reshape)
import System.Exit (exitFailure)
import Text.Printf (printf)

import Layers
import ResNet

-- | The model and BatchNorm settings the checks run: gradients are checked alike under any recipe, and the contract's
-- (contract.recipe(), at the time of writing) makes the errors measured below those of the model that trains.
testRecipe :: Recipe
testRecipe =
  Recipe {bnEpsilon = 1e-5, bnMomentum = 0.1, sgdMomentum = 0.9, stageWidths = [64, 128, 256, 512], numClasses = 10}

-- | Deterministic values in [-1, 1), different for every seed.
noise :: Int -> Int -> V.Vector Double
noise seed n = V.generate n $ \i ->
  let v = sin (fromIntegral (i * 7919 + seed * 104729) * 12.9898) * 43758.5453
   in 2 * (v - fromIntegral (floor v :: Int)) - 1

-- | Numeric derivatives of f at x for the given coordinates, central differences with the given step.
numeric :: Double -> (V.Vector Double -> Double) -> V.Vector Double -> [Int] -> V.Vector Double
numeric step f x coordinates = V.fromList [(f (bump i step) - f (bump i (-step))) / (2 * step) | i <- coordinates]
  where
    bump i d = x V.// [(i, x V.! i + d)]

relativeError :: V.Vector Double -> V.Vector Double -> Double
relativeError analytic numeric' =
  norm (V.zipWith (-) analytic numeric') / max 1e-30 (max (norm analytic) (norm numeric'))
  where
    norm = sqrt . V.sum . V.map (^ (2 :: Int))

-- | A check: its name, analytic gradient at the chosen coordinates, numeric gradient there.
data Check = Check String (V.Vector Double) (V.Vector Double)

-- | Checks every coordinate of x (the shapes are small) for L(x) = sum (f x * r).
gradientOf :: String -> (V.Vector Double -> V.Vector Double) -> V.Vector Double -> V.Vector Double -> Check
gradientOf name f x analytic =
  Check name analytic (numeric 1e-5 (\x' -> V.sum (V.zipWith (*) (f x') r)) x [0 .. V.length x - 1])
  where
    r = noise 99 (V.length (f x))

convChecks :: String -> Int -> Int -> Int -> Shape -> Int -> [Check]
convChecks name k s p inShape out =
  [ gradientOf (name ++ " input") (\x' -> values (fst (convForward conv (Tensor inShape x')))) x dx
  , gradientOf (name ++ " weight") (\w' -> values (fst (convForward (Conv k s p (reshape out w')) input)))
               (flatten weight) (flatten dw) ]
  where
    x = noise 1 (rowCount inShape * channels inShape)
    weight = reshape out (noise 2 (k * k * channels inShape * out))
    conv = Conv k s p weight
    input = Tensor inShape x
    (y, patches) = convForward conv input
    (Tensor _ dx, dw) = convBackward conv inShape patches (Tensor (shape y) (noise 99 (V.length (values y))))

batchNormChecks :: [Check]
batchNormChecks =
  [ gradientOf "batchnorm input" (\x' -> out (Tensor s x') bn) x dx
  , gradientOf "batchnorm gamma" (\g -> out input bn {gamma = g}) (gamma bn) dgamma
  , gradientOf "batchnorm beta" (\b -> out input bn {beta = b}) (beta bn) dbeta ]
  where
    s = Shape 2 3 2 4
    x = V.map (* 3) (noise 3 (rowCount s * 4))
    input = Tensor s x
    bn = BatchNorm (bnEpsilon testRecipe) (bnMomentum testRecipe) (noise 4 4) (noise 5 4) (V.replicate 4 0)
                   (V.replicate 4 1)
    out t b = let (Tensor _ y, _, _) = batchNorm Train b t in y
    (_, _, cache) = batchNorm Train bn input
    (Tensor _ dx, dgamma, dbeta) = batchNormBackward bn cache (Tensor s (noise 99 (V.length x)))

elementwiseChecks :: [Check]
elementwiseChecks =
  [ gradientOf "relu" (values . relu . Tensor s) x (values (reluBackward (relu input) r))
  , gradientOf "max pool 3x3/2, padding 1" (values . fst . maxPool . Tensor s) x
               (values (maxPoolBackward s argmax pooledR))
  , gradientOf "global average pool" (\x' -> flatten (globalAvgPool (Tensor s x'))) x
               (values (globalAvgPoolBackward s avgR)) ]
  where
    s = Shape 2 5 4 3 -- odd and even sides: the pool's padding on both
    x = noise 6 (rowCount s * 3) -- distinct values, none at a ReLU's kink or a max-pool tie
    input = Tensor s x
    r = Tensor s (noise 99 (V.length x))
    (pooled, argmax) = maxPool input
    pooledR = Tensor (shape pooled) (noise 99 (V.length (values pooled)))
    avgR = reshape 3 (noise 99 (2 * 3))

linearChecks :: [Check]
linearChecks =
  [ gradientOf "linear features" (\f -> flatten (linear weight bias (reshape 5 f))) (flatten features)
               (flatten dfeatures)
  , gradientOf "linear weight" (\w -> flatten (linear (reshape 3 w) bias features)) (flatten weight) (flatten dweight)
  , gradientOf "linear bias" (\b -> flatten (linear weight b features)) bias dbias
  , Check "softmax cross-entropy (mean over the batch)" (flatten dlogits)
      (numeric 1e-5 (\z -> let (l, _, _) = crossEntropy (reshape 3 z) labels in l / 4) (flatten logits') [0 .. 11]) ]
  where
    features = reshape 5 (noise 7 (4 * 5)) :: Matrix Double
    weight = reshape 3 (noise 8 (5 * 3))
    bias = noise 9 3
    (dfeatures, dweight, dbias) = linearBackward weight features (reshape 3 (noise 99 (4 * 3)))
    logits' = reshape 3 (V.map (* 4) (noise 10 12))
    labels = V.fromList [0, 2, 1, 2]
    (_, _, dlogits) = crossEntropy logits' labels

-- | The whole model: the mean cross-entropy of four images in train mode, 3 coordinates of every trainable tensor.
-- The step: a BatchNorm weight or bias (a vector of at most 512) moves a whole channel, and at 1e-5 some of its ~800
-- values cross a ReLU's or max pool's kink (measured: 7% off at 1e-5, 1e-8 at 1e-7): 1e-7 there. A convolution or
-- linear weight has gradients down to 1e-4, where 1e-7's rounding shows (1e-4 relative): 1e-5 there.
modelChecks :: [Check]
modelChecks = zipWith3 check [0 :: Int ..] params grads
  where
    model = importCanonical testRecipe (V.map (* 0.5) (noise 11 (canonicalSize testRecipe))) :: ResNet18 Double
    images = noise 12 (4 * imageSize * imageSize)
    labels = V.fromList [3, 1, 4, 1]
    input = Tensor (Shape 4 imageSize imageSize 1) images
    loss m = let (out, _, _) = forward Train m input; (l, _, _) = crossEntropy out labels in l / 4
    (out0, _, cache) = forward Train model input
    (_, _, dlogits) = crossEntropy out0 labels
    params = parameters model
    grads = parameters (backward model cache dlogits)
    check t p g =
      let coordinates = [(t * 7919 + j * 104729) `mod` V.length p | j <- [0 .. 2]]
          perturbed p' = loss (withParameters model [if u == t then p' else q | (u, q) <- zip [0 ..] params])
          step = if V.length p <= 512 then 1e-7 else 1e-5
       in Check ("ResNet18 tensor " ++ show t) (V.fromList (map (g V.!) coordinates))
                (numeric step perturbed p coordinates)

main :: IO ()
main = do
  let layerChecks = concat
        [ convChecks "conv 3x3/2, padding 1" 3 2 1 (Shape 2 5 5 3) 4
        , convChecks "conv 3x3/1, padding 1" 3 1 1 (Shape 2 4 4 2) 3
        , convChecks "conv 7x7/2, padding 3 (stem)" 7 2 3 (Shape 1 6 6 1) 2
        , convChecks "conv 1x1/2 (downsample)" 1 2 0 (Shape 2 5 5 3) 4
        , batchNormChecks, elementwiseChecks, linearChecks ]
      results = [(name, relativeError a n, 1e-6) | Check name a n <- layerChecks]
        -- The whole network: rounding through 20 layers (measured up to 6.6e-7).
        ++ [(name, relativeError a n, 1e-5) | Check name a n <- modelChecks]
      failures = [r | r@(_, err, bound) <- results, not (err <= bound)]
  mapM_ (\(name, err, bound) -> printf "%-45s relative error %.2e (bound %.0e)%s\n" name err bound
                                  (if err <= bound then "" else "  FAILED" :: String)) results
  printf "%d gradient checks, %d failed\n" (length results) (length failures)
  unless (null failures) exitFailure
