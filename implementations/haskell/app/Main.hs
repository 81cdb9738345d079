{-# LANGUAGE CPP, ScopedTypeVariables #-}
-- | The protocol between implementations/haskell/trainer.py and the Haskell trainer, on standard input and output.
--
-- A request is one ASCII line, a command and its arguments, followed by the binary payload it names; a reply is one
-- ASCII line, "ok" and its numbers, followed by the binary payload it names, or "error <message>". Arrays cross as raw
-- little-endian float32 (f32) or int32 (i32), their lengths given by the line. The first request is `recipe`.
--
--   recipe NAME=VALUE...  contract.recipe(), every name once: bn_epsilon=1e-05 ... stage_widths=[64,128,256,512];
--                         builds the model (its weights come with import)
--   version               -> ok GHC_AND_LIBRARY_VERSIONS
--   data N M              f32[N*784] i32[N] f32[M*784] i32[M]  training and test images (normalized) and labels
--   schedule S            f32[S]                               the contract's learning-rate table
--   import                f32[canonical]                       start afresh from canonical weights
--   export                -> ok, f32[canonical]
--   trainable_parameters  -> ok COUNT
--   train_on_batch B      f32[B*784] i32[B]  -> ok LOSS
--   train_batches S B     i32[S*B]           -> "progress K" after each step K = 1..S, then
--                                               ok MEAN_LOSS SECONDS, i32[S*B] the labels consumed
--   evaluate B            -> ok LOSS_SUM CORRECT               eval mode, B test images at a time
--   logits B TRAIN        f32[B*784]         -> ok, f32[B*C]   C classes; TRAIN: 1 batch statistics, 0 running ones
--   learning_rates N      i32[N]             -> ok, f32[N]
module Main (main) where

import Control.Exception (ErrorCall (..), SomeException, throwIO, try)
import qualified Control.Exception as E
import Control.Monad (unless, when)
import Data.IORef (newIORef, readIORef, writeIORef)
import Data.Int (Int32)
import Data.List (sort)
import qualified Data.Vector.Storable as V
import Foreign.ForeignPtr (mallocForeignPtrArray)
import Foreign.Storable (Storable, sizeOf)
import Numeric.LinearAlgebra (flatten)
import System.IO
import Data.Version (showVersion)
import System.Info (fullCompilerVersion)
import Text.Read (readMaybe)

import Layers (Mode (..))
import ResNet

readArray :: forall a. Storable a => Int -> IO (V.Vector a)
readArray n = do
  buffer <- mallocForeignPtrArray n
  let bytes = n * sizeOf (undefined :: a)
      vector = V.unsafeFromForeignPtr0 buffer n
  got <- V.unsafeWith vector $ \p -> hGetBuf stdin p bytes
  when (got /= bytes) $ throwIO (ErrorCall ("expected " ++ show bytes ++ " bytes of payload, got " ++ show got))
  pure vector

writeArray :: forall a. Storable a => V.Vector a -> IO ()
writeArray v = V.unsafeWith v $ \p -> hPutBuf stdout p (V.length v * sizeOf (undefined :: a))

reply :: [String] -> IO ()
reply fields = hPutStr stdout (unwords ("ok" : fields) ++ "\n")

main :: IO ()
main = do
  mapM_ (`hSetBinaryMode` True) [stdin, stdout]
  state <- newIORef Nothing
  let serve = do
        eof <- hIsEOF stdin
        unless eof $ do
          request <- words <$> hGetLine stdin
          current <- readIORef state
          outcome <- try (handle current request >>= E.evaluate)
          case outcome of
            Right t -> writeIORef state (Just t)
            Left (e :: SomeException) -> hPutStr stdout ("error " ++ unwords (lines (show e)) ++ "\n")
          hFlush stdout
          serve
  serve

-- | Runs one request; the returned state is forced before the reply's end is flushed.
handle :: Maybe TrainState -> [String] -> IO TrainState
handle _ ("recipe" : settings) = do
  r <- readRecipe settings
  reply [] >> pure (newTrainState r)
handle Nothing request = throwIO (ErrorCall ("the first request is recipe, not " ++ show (unwords request)))
handle (Just t) request = case request of
  ["version"] -> do
    reply ["GHC", showVersion fullCompilerVersion, "hmatrix", VERSION_hmatrix, "vector", VERSION_vector] >> pure t
  ["data", n, m] -> do
    train <- Dataset <$> readArray (read n * pixels) <*> readArray (read n)
    test <- Dataset <$> readArray (read m * pixels) <*> readArray (read m)
    reply [] >> pure t {trainData = train, testData = test}
  ["schedule", s] -> do
    table <- readArray (read s)
    reply [] >> pure t {schedule = table}
  ["import"] -> do
    weights <- importCanonical (recipe t) <$> readArray (canonicalSize (recipe t))
    _ <- E.evaluate (forceModel weights)
    reply [] >> pure (startFrom weights t)
  ["export"] -> do
    let flat = exportCanonical (model t)
    _ <- E.evaluate (V.length flat)
    reply [] >> writeArray flat >> pure t
  ["trainable_parameters"] -> reply [show (trainableParameters (model t))] >> pure t
  ["train_on_batch", b] -> do
    pixels <- readArray (read b * pixels)
    labels <- readArray (read b)
    let (loss, t') = trainOnBatch t pixels labels
    reply [show loss] >> pure t'
  ["train_batches", s, b] -> do
    batches <- readArray (read s * read b)
    let progress k = hPutStr stdout ("progress " ++ show k ++ "\n") >> hFlush stdout
    (t', meanLoss, seconds, consumed) <- trainBatches t (read b) batches progress
    reply [show meanLoss, show seconds]
    writeArray (V.map fromIntegral consumed :: V.Vector Int32) >> pure t'
  ["evaluate", b] -> do
    (lossSum, correct) <- E.evaluate (evaluate t (read b))
    reply [show lossSum, show correct] >> pure t
  ["logits", b, train] -> do
    pixels <- readArray (read b * pixels)
    let out = flatten (logits t (if train == "1" then Train else Eval) pixels)
    _ <- E.evaluate (V.length out)
    reply [] >> writeArray out >> pure t
  ["learning_rates", n] -> do
    rates <- learningRates t <$> readArray (read n)
    _ <- E.evaluate (V.sum rates)
    reply [] >> writeArray rates >> pure t
  _ -> throwIO (ErrorCall ("unknown request " ++ show (unwords request)))
  where
    pixels = imageSize * imageSize

-- | The recipe from NAME=VALUE fields (JSON values): exactly contract.recipe()'s names, so that a constant the
-- contract adds stops the program rather than going unheard.
readRecipe :: [String] -> IO Recipe
readRecipe settings = do
  let named = [(name, drop 1 value) | setting <- settings, let (name, value) = break (== '=') setting]
      expected = ["bn_epsilon", "bn_momentum", "num_classes", "sgd_momentum", "stage_widths"]
      value :: Read a => String -> IO a
      value name = maybe (throwIO (ErrorCall ("recipe: cannot read " ++ name ++ "=" ++ concat (lookup name named))))
                         pure (readMaybe =<< lookup name named)
  when (sort (map fst named) /= expected) $
    throwIO (ErrorCall ("recipe: expected the settings " ++ unwords expected ++ ", got " ++ unwords (map fst named)))
  Recipe <$> value "bn_epsilon" <*> value "bn_momentum" <*> value "sgd_momentum" <*> value "stage_widths"
         <*> value "num_classes"
