{-# LANGUAGE CPP, ScopedTypeVariables #-}
-- | The protocol between implementations/haskell/trainer.py and the Haskell trainer, on standard input and output.
--
-- A request is one ASCII line, a command and its integer arguments, followed by the binary payload it names; a reply
-- is one ASCII line, "ok" and its numbers, followed by the binary payload it names, or "error <message>". Arrays
-- cross as raw little-endian float32 (f32) or int32 (i32), their lengths given by the line.
--
--   version              -> ok GHC_AND_LIBRARY_VERSIONS
--   data N M             f32[N*784] i32[N] f32[M*784] i32[M]  training and test images (normalized) and labels
--   schedule S           f32[S]                               the contract's learning-rate table
--   import               f32[canonical]                       start afresh from canonical weights
--   export               -> ok, f32[canonical]
--   train_step B         f32[B*784] i32[B]  -> ok LOSS
--   train_epoch S B      i32[S*B]           -> ok MEAN_LOSS SECONDS, i32[S*B] the labels consumed
--   evaluate B           -> ok LOSS_SUM CORRECT               eval mode, B test images at a time
--   logits B TRAIN       f32[B*784]         -> ok, f32[B*10]  TRAIN: 1 batch statistics, 0 running statistics
--   learning_rates N     i32[N]             -> ok, f32[N]
module Main (main) where

import Control.Exception (ErrorCall (..), SomeException, throwIO, try)
import qualified Control.Exception as E
import Control.Monad (unless, when)
import Data.IORef (newIORef, readIORef, writeIORef)
import Data.Int (Int32)
import qualified Data.Vector.Storable as V
import Foreign.ForeignPtr (mallocForeignPtrArray)
import Foreign.Storable (Storable, sizeOf)
import Numeric.LinearAlgebra (flatten)
import System.IO
import Data.Version (showVersion)
import System.Info (fullCompilerVersion)

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
  let empty = Dataset V.empty V.empty
  state <- newIORef (newTrainer resnet18 V.empty empty empty)
  let serve = do
        eof <- hIsEOF stdin
        unless eof $ do
          request <- words <$> hGetLine stdin
          trainer <- readIORef state
          outcome <- try (handle trainer request >>= E.evaluate)
          case outcome of
            Right trainer' -> writeIORef state trainer'
            Left (e :: SomeException) -> hPutStr stdout ("error " ++ unwords (lines (show e)) ++ "\n")
          hFlush stdout
          serve
  serve

-- | Runs one request; the returned trainer is forced before the reply's end is flushed.
handle :: Trainer -> [String] -> IO Trainer
handle t request = case request of
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
    weights <- importCanonical <$> readArray canonicalSize
    _ <- E.evaluate (forceModel weights)
    reply [] >> pure (resetTrainer t weights)
  ["export"] -> do
    let flat = exportCanonical (model t)
    _ <- E.evaluate (V.length flat)
    reply [] >> writeArray flat >> pure t
  ["train_step", b] -> do
    pixels <- readArray (read b * pixels)
    ys <- V.map fromIntegral <$> (readArray (read b) :: IO (V.Vector Int32))
    let (loss, t') = trainStep t pixels ys
    _ <- E.evaluate (forceModel (model t'))
    reply [show loss] >> pure t'
  ["train_epoch", s, b] -> do
    indices <- readArray (read s * read b)
    (t', meanLoss, seconds, consumed) <- trainEpoch t (read b) indices
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
    steps <- readArray (read n) :: IO (V.Vector Int32)
    let rates = V.map (learningRate t . fromIntegral) steps
    _ <- E.evaluate (V.sum rates)
    reply [] >> writeArray rates >> pure t
  _ -> throwIO (ErrorCall ("unknown request " ++ show (unwords request)))
  where
    pixels = imageSize * imageSize
