// Status, Result<T>, errno_name and UHMM_TRY.
#include <gtest/gtest.h>

#include <cerrno>
#include <memory>
#include <string>

#include "uhmm/status.hpp"

namespace uhmm {
namespace {

TEST(Status, DefaultIsOk) {
  Status s;
  EXPECT_TRUE(s.is_ok());
  EXPECT_TRUE(static_cast<bool>(s));
  EXPECT_EQ(s.code(), 0);
  EXPECT_TRUE(s.message().empty());
  EXPECT_EQ(s.to_string(), "OK");
  EXPECT_TRUE(Status::ok().is_ok());
}

TEST(Status, ErrorCarriesCodeAndMessage) {
  Status s = Status::error(EBUSY, "page map has 3 pages in use");
  EXPECT_FALSE(s.is_ok());
  EXPECT_FALSE(static_cast<bool>(s));
  EXPECT_EQ(s.code(), EBUSY);
  EXPECT_EQ(s.message(), "page map has 3 pages in use");
  EXPECT_EQ(s.to_string(), "EBUSY: page map has 3 pages in use");
}

TEST(Status, ErrorWithoutMessagePrintsOnlyTheName) {
  Status s = Status::error(EINVAL);
  EXPECT_EQ(s.code(), EINVAL);
  EXPECT_EQ(s.to_string(), "EINVAL");
}

TEST(Status, UnknownCodePrintsTheNumber) {
  EXPECT_EQ(Status::error(4242, "odd").to_string(), "errno 4242: odd");
}

TEST(Status, EqualityComparesCodesOnly) {
  EXPECT_EQ(Status::error(EIO, "a"), Status::error(EIO, "b"));
  EXPECT_FALSE(Status::error(EIO) == Status::error(EFAULT));
  EXPECT_EQ(Status::ok(), Status());
  EXPECT_FALSE(Status::ok() == Status::error(EPERM));
}

TEST(ErrnoName, KnownCodes) {
  EXPECT_EQ(errno_name(0), "OK");
  EXPECT_EQ(errno_name(EPERM), "EPERM");
  EXPECT_EQ(errno_name(ENOENT), "ENOENT");
  EXPECT_EQ(errno_name(EIO), "EIO");
  EXPECT_EQ(errno_name(EAGAIN), "EAGAIN");
  EXPECT_EQ(errno_name(ENOMEM), "ENOMEM");
  EXPECT_EQ(errno_name(EACCES), "EACCES");
  EXPECT_EQ(errno_name(EFAULT), "EFAULT");
  EXPECT_EQ(errno_name(EBUSY), "EBUSY");
  EXPECT_EQ(errno_name(EEXIST), "EEXIST");
  EXPECT_EQ(errno_name(EINVAL), "EINVAL");
  EXPECT_EQ(errno_name(ENOSPC), "ENOSPC");
  EXPECT_EQ(errno_name(ENOSYS), "ENOSYS");
  EXPECT_EQ(errno_name(ETIMEDOUT), "ETIMEDOUT");
  EXPECT_EQ(errno_name(EOPNOTSUPP), "EOPNOTSUPP");
}

TEST(ErrnoName, UnknownCodeIsTheNumber) {
  EXPECT_EQ(errno_name(9999), "errno 9999");
  EXPECT_EQ(errno_name(-3), "errno -3");
}

TEST(Result, HoldsAValue) {
  Result<int> r = 42;
  ASSERT_TRUE(r.is_ok());
  EXPECT_TRUE(static_cast<bool>(r));
  EXPECT_EQ(r.value(), 42);
  EXPECT_EQ(*r, 42);
  EXPECT_EQ(r.code(), 0);
  EXPECT_TRUE(r.status().is_ok());
  r.value() = 7;  // value() is a reference
  EXPECT_EQ(*r, 7);
  const Result<int>& cr = r;
  EXPECT_EQ(cr.value(), 7);
}

TEST(Result, ArrowReachesMembers) {
  Result<std::string> r = std::string("hello");
  EXPECT_EQ(r->size(), 5u);
  r->append("!");
  EXPECT_EQ(*r, "hello!");
}

TEST(Result, HoldsAnError) {
  Result<int> r = Status::error(ENOENT, "nothing there");
  EXPECT_FALSE(r.is_ok());
  EXPECT_FALSE(static_cast<bool>(r));
  EXPECT_EQ(r.code(), ENOENT);
  EXPECT_EQ(r.status().code(), ENOENT);
  EXPECT_EQ(r.status().message(), "nothing there");
  EXPECT_EQ(r.status().to_string(), "ENOENT: nothing there");
}

TEST(Result, BuiltFromOkStatusIsAnEinvalError) {
  Result<int> r = Status::ok();
  EXPECT_FALSE(r.is_ok());
  EXPECT_EQ(r.code(), EINVAL);
}

TEST(Result, MoveOnlyValueCanBeMovedOut) {
  Result<std::unique_ptr<int>> r = std::make_unique<int>(9);
  ASSERT_TRUE(r.is_ok());
  std::unique_ptr<int> p = std::move(r).value();
  ASSERT_NE(p, nullptr);
  EXPECT_EQ(*p, 9);
}

TEST(ResultDeathTest, ValueOfAnErrorAborts) {
  GTEST_FLAG_SET(death_test_style, "threadsafe");
  Result<int> r = Status::error(EIO);
  EXPECT_DEATH((void)r.value(), "");
  EXPECT_DEATH((void)*r, "");
}

Status fails_with(int code, int* reached) {
  UHMM_TRY(code == 0 ? Status::ok() : Status::error(code, "inner"));
  ++*reached;
  return Status::ok();
}

TEST(UhmmTry, PropagatesErrorsAndContinuesOnSuccess) {
  int reached = 0;
  Status s = fails_with(EFAULT, &reached);
  EXPECT_EQ(s.code(), EFAULT);
  EXPECT_EQ(s.message(), "inner");
  EXPECT_EQ(reached, 0);
  EXPECT_TRUE(fails_with(0, &reached).is_ok());
  EXPECT_EQ(reached, 1);
}

}  // namespace
}  // namespace uhmm
